#!/usr/bin/env bash
# BadActs next to D3 on CPU-scale records (issue 13): purification ACC/ASR through `compare` and detection
# AUROC / TPR at 5 % FPR through `detect`, 3 seeds (each its own reserved draw), 5 attacks.
#
#   bash benchmarks/badacts_evidence.sh [WORK] [SEEDS]       (default /tmp/badacts_evidence, 0,1,2)
#   .venv/bin/python benchmarks/badacts_table.py WORK          (the Markdown table)
#
# Records: `d3-plugin attack <a>` on a seeded 12,000-image Fashion-MNIST subset, small CNN, 5 epochs (already
# complete records are kept). Defenses: 20 epochs each on a 1 % reserved set (600 images).
set -euo pipefail
WORK="${1:-/tmp/badacts_evidence}"; SEEDS="${2:-0,1,2}"
BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
mkdir -p "$WORK/record"
for attack in badnets blended wanet sig lf; do
  record="$WORK/record/$attack"
  [ -f "$record/attack_result.pt" ] || "$BIN/d3-plugin" attack "$attack" --out "$record" --epochs 5 \
      --train-size 12000 --device cpu > "$WORK/$attack.attack.log" 2>&1
  "$BIN/d3-plugin" compare --result_file "$record" --defenses d3,badacts --seeds "$SEEDS" --epochs 20 \
      --ratio 0.01 --device cpu --out "$WORK/compare/$attack" > "$WORK/$attack.compare.log" 2>&1 || true
  for seed in ${SEEDS//,/ }; do
    "$BIN/d3-plugin" detect --result_file "$record" --seed "$seed" --ratio 0.01 --device cpu \
        --out "$WORK/detect/$attack/seed$seed" > "$WORK/$attack.detect$seed.log" 2>&1
  done
  echo "$attack done"
done
