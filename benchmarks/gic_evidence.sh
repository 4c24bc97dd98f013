#!/usr/bin/env bash
# GIC evidence (issue 13): D3, FT and FST on BadNets and Blended with each kind of auxiliary (reserved) data,
# without and with GIC calibration, 3 seeds (each its own reserved draw, calibration seed and defense seed).
#
#   bash benchmarks/gic_evidence.sh [WORK] [SEEDS] [SOURCES]     (default /tmp/gic_evidence, 0,1,2, see below)
#   .venv/bin/python benchmarks/gic_table.py WORK                  (the Markdown tables)
#
# Records: `d3-plugin attack <a>` on a seeded 20,000-image Fashion-MNIST subset, small CNN, 15 epochs (complete
# records are kept). Defenses: 20 epochs each; the reserved draw is 1 % of the training set (600 images), and
# every auxiliary source is made from that draw (corruptions of it) or has its size (digits, inversion).
set -euo pipefail
WORK="${1:-/tmp/gic_evidence}"; SEEDS="${2:-0,1,2}"
SOURCES="${3:-id corrupt:noise:3 corrupt:blur:3 corrupt:jpeg:5 digits inversion}"
BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
mkdir -p "$WORK/record"
for attack in badnets blended; do
  record="$WORK/record/$attack"
  [ -f "$record/attack_result.pt" ] || "$BIN/d3-plugin" attack "$attack" --out "$record" --epochs 15 \
      --train-size 20000 --device cpu > "$WORK/$attack.attack.log" 2>&1
  for source in $SOURCES; do
    for calibrate in none gic; do
      name="${source//:/-}"; extra=()
      [ "$calibrate" = gic ] && { name="$name+gic"; extra=(--calibrate gic); }
      "$BIN/d3-plugin" compare --result_file "$record" --defenses d3,ft,fst --seeds "$SEEDS" --epochs 20 \
          --ratio 0.01 --device cpu --reserved-source "$source" "${extra[@]}" --out "$WORK/compare/$attack/$name" \
          > "$WORK/compare.$attack.$name.log" 2>&1 || echo "$attack $name: failed (see its log)"
      echo "$attack $name done"
    done
  done
done
