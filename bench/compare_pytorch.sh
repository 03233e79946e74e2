#!/usr/bin/env bash
# Runs `troupe bench train` and bench/pytorch_gpt.py alternately (ROUNDS rounds each, default 3)
# on config/$1.toml and prints every JSON line, then the median ratios troupe/PyTorch; the last
# line is `ratio_tokens_per_s=X`.
# Usage: bench/compare_pytorch.sh cpu-small [steps] [threads]   (env: ROUNDS, PYTORCH_ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: bench/compare_pytorch.sh CONFIG_NAME [steps] [threads]}
steps=${2:-20}
threads=${3:-2}
rounds=${ROUNDS:-3}
cfg=config/$name.toml
cargo build --release --quiet
out=$(mktemp)
for _ in $(seq "$rounds"); do
  ./target/release/troupe bench train --config "$cfg" --steps "$steps" --threads "$threads" | tee -a "$out"
  # shellcheck disable=SC2086
  python3 bench/pytorch_gpt.py --config "$cfg" --steps "$steps" --threads "$threads" ${PYTORCH_ARGS:-} | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ours = [r for r in rows if r["impl"] == "troupe"]
peer = [r for r in rows if r["impl"] != "troupe"]
med = lambda rs, k: statistics.median(r[k] for r in rs)
print(f"troupe median tokens/s {med(ours, 'tokens_per_s'):.1f}, peak RSS {med(ours, 'peak_rss_mb'):.0f} MB")
print(f"{peer[0]['impl']} median tokens/s {med(peer, 'tokens_per_s'):.1f}, peak RSS {med(peer, 'peak_rss_mb'):.0f} MB")
print(f"ratio_peak_rss={med(ours, 'peak_rss_mb') / med(peer, 'peak_rss_mb'):.3f}")
print(f"ratio_tokens_per_s={med(ours, 'tokens_per_s') / med(peer, 'tokens_per_s'):.3f}")
PY
rm -f "$out"
