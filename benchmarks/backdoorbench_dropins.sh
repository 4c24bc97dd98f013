#!/usr/bin/env bash
# Every native defense as a drop-in script of a real BackdoorBench checkout, then each result loaded by
# BackdoorBench's own generate_cls_model + load_state_dict (issue 12's check in the real checkout).
#
#   bash benchmarks/backdoorbench_dropins.sh CHECKOUT PYTHON RECORD [EPOCHS]
#   e.g. bash benchmarks/backdoorbench_dropins.sh /work/bb /work/bbenv/bin/python tiny_preact 1
#
# PYTHON: a venv with BackdoorBench's requirements (benchmarks/backdoorbench_env.sh) and d3-plugin installed
# (pip install -e .). RECORD: a folder under CHECKOUT/record (the cifar10.yaml configs are used).
set -euo pipefail
CHECKOUT="$1"; PY="$2"; RECORD="$3"; EPOCHS="${4:-1}"
cd "$CHECKOUT"
"$PY" -m d3_plugin.cli install . --defenses all > /dev/null
for script in $(ls defense | sed -n 's/\.py$//p'); do
  head -1 "defense/$script.py" | grep -q "^# d3-plugin: generated" || continue
  extra=()
  [ "$script" = d3p_anp ] && extra=(--prune_by number --prune_value 3)  # 1 epoch of masks may select nothing
  start=$(date +%s)
  status=0
  "$PY" "defense/$script.py" --result_file "$RECORD" --yaml_path "./config/defense/$script/cifar10.yaml" \
      --epochs "$EPOCHS" --device cpu "${extra[@]}" > "/tmp/dropin_$script.log" 2>&1 || status=$?
  echo "$script: exit $status, $(( $(date +%s) - start )) s (log /tmp/dropin_$script.log)"
done
"$PY" - "$RECORD" <<'PY'
import glob, sys
import torch
sys.path.insert(0, ".")
from utils.aggregate_block.model_trainer_generate import generate_cls_model  # BackdoorBench's own
for path in sorted(glob.glob(f"record/{sys.argv[1]}/defense/*/defense_result.pt")):
    result = torch.load(path, map_location="cpu", weights_only=True)
    model = generate_cls_model(result["model_name"], result["num_classes"], 32)
    print(path, result["model_name"], model.load_state_dict(result["model"]))
PY
