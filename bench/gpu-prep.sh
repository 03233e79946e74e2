#!/usr/bin/env bash
# Builds, on the development machine, everything bench/gpu.sh runs on a GPU machine (which has no
# Rust toolchain): the release binary and the GPU test binaries, copied to target/gpu-bundle/.
# Carry that folder with the tree (about 45 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out/tests"
cp target/release/troupe "$out/"
cargo test --release --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    name = m.get("target", {}).get("name", "")
    # gpu_dp drives the emulator through the binary at its build path, and gpu_emu_schedules and
    # gpu_nvrtc need no GPU: CI runs them, not the GPU machine.
    if exe and m.get("profile", {}).get("test") and name.startswith("gpu_") and name not in ("gpu_dp", "gpu_emu_schedules", "gpu_nvrtc"):
        shutil.copy(exe, os.path.join(sys.argv[1], name))
        print("bundled", name)
' "$out/tests"
# Symbols off (panic messages keep their file and line): a quarter smaller, well inside what a
# device call may carry (64 MiB).
strip "$out/troupe" "$out"/tests/* 2>/dev/null || true
# Which commit the bundle is (the GPU machine gets the tree without its history).
{ git rev-parse --short HEAD; git status --porcelain | grep -q . && echo "(with uncommitted changes)"; } \
  >"$out/COMMIT" 2>/dev/null || true
ls -la "$out" "$out/tests"
