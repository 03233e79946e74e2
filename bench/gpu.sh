#!/usr/bin/env bash
# Every GPU check and benchmark in one script, for the GPU machines (one H100/H200, CUDA 13,
# driver 580, PyTorch and NCCL from Python packages, no Rust toolchain, no network).
#
# On the development machine first:   cargo build --release && cargo test --release --no-run
# then copy the tree with target/release (the binaries) to the GPU machine and run:
#   bench/gpu.sh [quick]
# It finds the CUDA libraries of the Python packages (NVRTC, cuBLAS/cuBLASLt, NCCL), runs the
# GPU tests (kernels vs their CPU twins, NVRTC compile), the training benchmark and the PyTorch
# baseline, and prints a short table last. Results go to $OUT (default bench/gpu-results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-results}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

# --- libraries from the Python packages --------------------------------------------------------
site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
libdirs=()
for s in $site; do
  for d in "$s"/nvidia/cu13/lib "$s"/nvidia/*/lib "$s"/nvidia/nccl/lib; do
    [ -d "$d" ] && libdirs+=("$d")
  done
done
# cudarc looks for libnccl.so; pip ships libnccl.so.2 only: link it from a directory of ours.
shim=$(mktemp -d)
for d in "${libdirs[@]}"; do
  [ -e "$d/libnccl.so.2" ] && ln -sf "$d/libnccl.so.2" "$shim/libnccl.so"
  [ -e "$d/libnvrtc.so.13" ] && [ ! -e "$d/libnvrtc.so" ] && ln -sf "$d/libnvrtc.so.13" "$shim/libnvrtc.so"
done
LD_LIBRARY_PATH="$shim:$(IFS=:; echo "${libdirs[*]}"):${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH
export TROUPE_CACHE_DIR=${TROUPE_CACHE_DIR:-$OUT/cache}
log "date $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# --- tests: every test binary whose name starts with gpu_ (kernels on CUDA and the emulator) ---
status=0
for t in target/release/deps/gpu_*; do
  case "$t" in *.d) continue ;; esac
  [ -x "$t" ] || continue
  name=$(basename "$t" | sed 's/-[0-9a-f]*$//')
  if "$t" --test-threads 1 >"$OUT/test-$name.log" 2>&1; then
    log "test $name: ok ($(grep -c SKIPPED "$OUT/test-$name.log") skipped messages)"
  else
    log "test $name: FAILED (see $OUT/test-$name.log)"; status=1
  fi
done
[ -x target/release/troupe ] || { log "target/release/troupe missing: build it first"; exit 1; }

[ "${1:-}" = quick ] && { cat "$OUT/summary.txt"; exit $status; }

# --- benchmarks -------------------------------------------------------------------------------
cfg=config/gpt2-124m.toml
timeout 300 ./target/release/troupe bench train --config $cfg --device cuda --steps 10 --warmup 2 \
  >"$OUT/bench-troupe.json" 2>"$OUT/bench-troupe.err"
log "troupe bench train --device cuda: rc $? $(tail -c 300 "$OUT/bench-troupe.json" "$OUT/bench-troupe.err" | tr '\n' ' ')"
timeout 300 python3 bench/pytorch_gpt.py --config $cfg --device cuda --compile --fused-adamw --steps 10 \
  --micro-batch-size 16 >"$OUT/bench-pytorch.json" 2>"$OUT/bench-pytorch.err" \
  || timeout 300 python3 bench/pytorch_gpt.py --config $cfg --device cuda --fused-adamw --steps 10 \
  --micro-batch-size 16 >"$OUT/bench-pytorch.json" 2>>"$OUT/bench-pytorch.err"
log "pytorch: $(tail -c 600 "$OUT/bench-pytorch.json")"
echo
echo "---- summary ----"
cat "$OUT/summary.txt"
exit $status
