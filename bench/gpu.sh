#!/usr/bin/env bash
# Every GPU check and benchmark in one script, for the GPU machines (one H100/H200, CUDA 13,
# driver 580, PyTorch and NCCL from Python packages, no Rust toolchain, no network).
#
# On the development machine first:   bench/gpu-prep.sh   (fills target/gpu-bundle/)
# then copy the tree with target/gpu-bundle to the GPU machine and run:
#   bench/gpu.sh
# It finds the CUDA libraries of the Python packages (NVRTC, cuBLAS/cuBLASLt, NCCL), runs the
# GPU tests (kernels vs their CPU twins, NVRTC compile), the training benchmark and the PyTorch
# baseline, loss curves against the CPU, and prints a short table last, within BUDGET seconds
# (default 560). Results go to $OUT (default bench/gpu-results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-results}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
# A device session is short: every step below is skipped (and says so) once less than its own
# timeout is left of BUDGET seconds (default 560, under the 600 s a device call may run), so the
# summary table is always printed. Results so far are in $OUT whatever happens.
BUDGET=${BUDGET:-560}
fits() { # seconds the next step may take; false (and a log line) if they are not left
  local left=$((BUDGET - SECONDS))
  [ "$left" -ge "$1" ] && return 0
  log "skipped ($left s of the budget left, the step may take $1 s): ${*:2}"
  return 1
}

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
# The emulated halves of the GPU tests already ran in CI; spend the GPU's time on the CUDA halves.
export TROUPE_SKIP_EMU=1
# A kernel that never ends fails its step with the wait it hung in, well before the step's own
# timeout kills it without a word (no step here waits seconds on the GPU).
export TROUPE_GPU_TIMEOUT=${TROUPE_GPU_TIMEOUT:-60}
log "date $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

bundle=target/gpu-bundle
[ -x $bundle/troupe ] || { log "$bundle/troupe missing: run bench/gpu-prep.sh on the development machine"; exit 1; }
troupe=$bundle/troupe
$troupe device 2>&1 | tee -a "$OUT/summary.txt"

# --- the order: what explains failures first (NVRTC, the MMA self-test, kernels, the model), then
# the headline numbers (troupe vs PyTorch on GPT-2 124M), then the rest, longest last.
status=0
gputest() { # test binary name, time limit
  local t=$bundle/tests/$1
  [ -x "$t" ] || { log "test $1: not bundled"; return; }
  fits "$2" "test $1" || return
  if timeout "$2" "$t" --test-threads 1 --nocapture >"$OUT/test-$1.log" 2>&1; then
    log "test $1: ok ($(grep -c 'SKIPPED' "$OUT/test-$1.log") skip messages)"
  else
    log "test $1: FAILED or timed out (see $OUT/test-$1.log)"; status=1
    grep -E "panicked|assert|Error" "$OUT/test-$1.log" | head -5 | tee -a "$OUT/summary.txt"
  fi
}
# (gpu_nvrtc, NVRTC's compiles and ptxas's register report, needs no GPU: CI runs it; the first
# kernel test below compiles the same PTX here and says so if NVRTC fails.)
for name in gpu_kernels_attention gpu_kernels_gelu gpu_kernels_layernorm gpu_kernels_crossentropy gpu_kernels_checksum \
  gpu_kernels_embedding gpu_kernels_optim gpu_model gpu_parity gpu_nccl; do
  gputest $name 120
done
# Should the hardware disagree with the emulator's ldmatrix (its self-test above), the tensor-core
# attention falls back to element-wise fragment loads for the rest of the run, so the numbers
# below still mean something.
# (libtest lists a failed test's name, indented by four spaces, under "failures:").
if grep -qx "    ldmatrix_fragment_loads_match_the_layouts_on_a_gpu" "$OUT/test-gpu_kernels_attention.log" 2>/dev/null; then
  export TROUPE_NO_LDMATRIX=1
  log "the ldmatrix self-test failed: TROUPE_NO_LDMATRIX=1 from here on"
fi

# --- benchmarks: GPT-2 124M, seq 1024, bf16, micro-batch MB (one microbatch per step) -----------
cfg=config/gpt2-124m.toml
MB=${MB:-16}
bench() { # name, then extra environment/arguments
  local name=$1; shift
  fits 150 "troupe $name" || return
  timeout 150 env "$@" $troupe bench train --config $cfg --device cuda --micro-batch-size "$MB" --steps 10 \
    --warmup 3 >"$OUT/bench-$name.json" 2>"$OUT/bench-$name.err"
  log "troupe $name: rc $? $(tail -c 400 "$OUT/bench-$name.json") $(tail -c 300 "$OUT/bench-$name.err")"
}
pytorch() { # name, limit, then extra arguments; eager first (fast), torch.compile last (slow to build)
  local name=$1 limit=$2; shift 2
  fits "$limit" "$name" || return
  timeout "$limit" python3 bench/pytorch_gpt.py --config $cfg --device cuda --fused-adamw --steps 10 \
    --micro-batch-size "$MB" "$@" >"$OUT/bench-$name.json" 2>"$OUT/bench-$name.err"
  log "$name: rc $? $(tail -c 500 "$OUT/bench-$name.json") $(tail -c 200 "$OUT/bench-$name.err")"
}
bench tc TROUPE_ATTENTION=auto
pytorch pytorch-eager 150
# Where the time goes (device time per kernel and GEMM shape; events slow the steps a little).
if fits 120 "profile"; then
  timeout 120 $troupe bench train --config $cfg --device cuda --micro-batch-size "$MB" --steps 3 --warmup 2 \
    --profile >"$OUT/bench-profile.json" 2>"$OUT/bench-profile.err"
  log "profile: rc $?; top kernels:"
  head -14 "$OUT/bench-profile.err" | tee -a "$OUT/summary.txt"
fi
# The MLP's GELU as separate kernels instead of in the cuBLASLt epilogues (GELU_AUX_BIAS, DGELU).
bench gelu-kernels TROUPE_GELU_EPILOGUE=0
# The actor runtime with the model chunk and its optimizer on the GPU against the GPU training
# loop, in the same process: the cost of the general path that pipeline parallelism on GPUs uses
# (the JSON also has host_device_copies_mb_per_step).
if fits 200 "troupe actors"; then
  timeout 200 $troupe bench train --config $cfg --device cuda --micro-batch-size "$MB" --microbatches 2 --actors \
    --steps 5 --warmup 2 >"$OUT/bench-actors.json" 2>"$OUT/bench-actors.err"
  log "troupe actors: rc $? $(tail -c 400 "$OUT/bench-actors.json") $(tail -c 300 "$OUT/bench-actors.err")"
fi
gputest gpu_pipeline 200

# --- loss curves: the default model (4 layers, hidden 256, head size 64: tensor-core attention in
# bf16) for 200 steps on the CPU, on the GPU in fp32 and in bf16 (and on GPU pipeline stages),
# same data and seed.
curve() { # name, then train arguments
  local name=$1; shift
  fits 120 "curve $name" || return
  timeout 120 $troupe train --train-iters 200 --eval-interval 0 --save "" --log-interval 1 --no-progress \
    --set logging.sample_tokens=0 --log-json "$OUT/curve-$name.jsonl" "$@" >"$OUT/curve-$name.err" 2>&1
  log "curve $name: rc $? $(tail -n 1 "$OUT/curve-$name.err")"
}
curve cpu --device cpu
curve cuda-bf16 --device cuda --dtype bf16
curve cuda-fp32 --device cuda --dtype fp32
curve cuda-pp2-bf16 --device cuda --dtype bf16 --pipeline-model-parallel-size 2
python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys, os
def load(name):
    try:
        rows = [json.loads(l) for l in open(os.path.join(sys.argv[1], f"curve-{name}.jsonl")) if l.strip()]
        return [r["loss"] for r in rows if "loss" in r and "step" in r]
    except Exception:
        return []
cpu = load("cpu")
for name in ("cuda-fp32", "cuda-bf16", "cuda-pp2-bf16"):
    got = load(name)
    n = min(len(cpu), len(got))
    if n == 0:
        print(f"curve {name}: no data"); continue
    d = [abs(a - b) for a, b in zip(got[:n], cpu[:n])]
    tail = d[max(0, n - 50):]
    print(f"curve {name} vs cpu: {n} steps, final {got[n-1]:.4f} vs {cpu[n-1]:.4f}, "
          f"max |diff| {max(d):.4f}, mean |diff| over the last 50 steps {sum(tail)/len(tail):.4f}")
PY
# Variants of the headline run, after the checks above: the tensor-core attention's fragments
# loaded element by element instead of by ldmatrix;
bench no-ldmatrix TROUPE_NO_LDMATRIX=1
# its forward's K and V tiles loaded synchronously instead of by cp.async;
bench no-cp-async TROUPE_NO_CP_ASYNC=1
# Every product's cuBLASLt algorithm chosen by timing the heuristic's top candidates (the JSON's
# "gemm_tuning" says how many products were tuned and how many moved off the first choice).
bench gemm-autotune TROUPE_GEMM_AUTOTUNE=1
bench simt TROUPE_ATTENTION=simt
pytorch pytorch-compile 240 --compile
echo
echo "---- summary ----"
cat "$OUT/summary.txt"
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
python3 - "$OUT" "${gpu_name:-unknown GPU}" "$(cat $bundle/COMMIT 2>/dev/null | tr '\n' ' ')" <<'PY'
import json, sys, os, datetime
rows = []
for name in ("tc", "simt", "gelu-kernels", "no-ldmatrix", "no-cp-async", "gemm-autotune", "actors", "pytorch-eager", "pytorch-compile"):
    p = os.path.join(sys.argv[1], f"bench-{name}.json")
    try:
        r = json.loads(open(p).read().strip().splitlines()[-1])
    except Exception:
        continue
    mfu = r.get("mfu")
    rows.append((name, r.get("tokens_per_s"), mfu, r.get("step_ms_median"), r.get("device_memory_peak_mb")))
print(f"{'run':<16} {'tokens/s':>12} {'MFU':>7} {'step ms':>9} {'GPU MiB':>9}")
for name, tps, mfu, ms, mem in rows:
    print(f"{name:<16} {tps or 0:>12.0f} {(mfu or 0)*100:>6.1f}% {ms or 0:>9.1f} {mem or 0:>9.0f}")
# The same rows as a Markdown table for BENCHMARKS.md, with the date, device and commit.
with open(os.path.join(sys.argv[1], "benchmarks-rows.md"), "w") as f:
    day = datetime.date.today().isoformat()
    f.write(f"GPT-2 124M, seq 1024, bf16, {day}, {sys.argv[2]}, commit {sys.argv[3].strip() or 'unknown'}\n\n")
    f.write("| run | tokens/s | MFU | step ms | GPU MiB |\n|---|---:|---:|---:|---:|\n")
    for name, tps, mfu, ms, mem in rows:
        f.write(f"| {name} | {tps or 0:.0f} | {(mfu or 0)*100:.1f}% | {ms or 0:.1f} | {mem or 0:.0f} |\n")
PY
exit $status
