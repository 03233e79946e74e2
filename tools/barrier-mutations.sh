#!/usr/bin/env bash
# Barrier mutations: removes each __syncthreads() of the CUDA kernels in turn (one per run, in a
# copy of cuda/ that TROUPE_KERNEL_SOURCES points the binaries at: no rebuild of troupe) and
# asks two questions of the emulator:
#   in order   — does a test of that kernel (its gpu_kernels_* file, and gpu_model) fail?
#   schedules  — does tests/gpu_emu_schedules.rs (the same bits in order, reversed and
#                shuffled) fail?
# A barrier whose removal neither notices is either redundant or untested; one that only the
# schedules notice is a race the in-order emulator hides. Prints a table; needs g++ and the
# release test binaries (built here if missing). About a minute per barrier on 2 cores.
#
#   tools/barrier-mutations.sh [FILE...]    # default: every kernel file and the prelude
set -euo pipefail
cd "$(dirname "$0")/.."
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(cuda/*.cu cuda/prelude.cuh)

# The test binaries, by name.
declare -A bin
while IFS=$'\t' read -r name exe; do bin[$name]=$exe; done < <(
  cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    exe = m.get("executable")
    if exe and m.get("profile", {}).get("test") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + "\t" + exe)
')
for need in gpu_emu_schedules gpu_model; do
  [ -n "${bin[$need]:-}" ] || { echo "no test binary $need" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export TROUPE_CACHE_DIR=$work/cache TROUPE_KERNEL_SOURCES=$work/cuda
# Runs a test binary's emulator tests; 0 when they pass.
passes() { "$1" --test-threads 2 emulator schedule >/dev/null 2>&1; }

printf '%-28s %-5s %-9s %-9s\n' "barrier" "line" "in order" "schedules"
total=0; in_order=0; scheduled=0; only_schedules=0
for f in "${files[@]}"; do
  base=$(basename "$f" .cu); base=${base%.cuh}
  # Lines with a barrier that is code (not inside a // comment).
  for line in $(grep -n '__syncthreads()' "$f" | grep -v '^[0-9]*:[[:space:]]*//' | cut -d: -f1); do
    rm -rf "$work/cuda" && cp -r cuda "$work/cuda"
    sed -i "${line}s/__syncthreads();/\/* barrier removed *\/;/" "$work/cuda/${f#cuda/}"
    cmp -s "$f" "$work/cuda/${f#cuda/}" && continue   # a mention, not a call
    total=$((total + 1))
    tests=(gpu_model)
    case $base in
      attention|attention_tc|attention_any) tests+=(gpu_kernels_attention) ;;
      prelude) tests+=(gpu_kernels_layernorm gpu_kernels_crossentropy gpu_kernels_optim) ;;
      checksum) tests+=(gpu_kernels_checksum) ;;
      *) [ -n "${bin[gpu_kernels_$base]:-}" ] && tests+=("gpu_kernels_$base") ;;
    esac
    a=missed
    for t in "${tests[@]}"; do passes "${bin[$t]}" || { a=caught; break; }; done
    b=missed
    passes "${bin[gpu_emu_schedules]}" || b=caught
    [ $a = caught ] && in_order=$((in_order + 1))
    [ $b = caught ] && scheduled=$((scheduled + 1))
    [ $a = missed ] && [ $b = caught ] && only_schedules=$((only_schedules + 1))
    printf '%-28s %-5s %-9s %-9s\n' "${f#cuda/}" "$line" "$a" "$b"
  done
done
echo "barriers removed: $total; caught in order: $in_order; caught by the schedules: $scheduled; only by the schedules: $only_schedules"
