#!/usr/bin/env bash
# Create a Python venv that can run BackdoorBench's own attack/defense scripts (and the D3 authors'
# fork of BackdoorBench) on a current CPU-only stack.
#
#   bash benchmarks/backdoorbench_env.sh [VENV_DIR]      (default /work/bbenv)
#
# BackdoorBench pins torch 1.11 / python 3.8; its scripts also run on current torch/numpy when the
# runner in benchmarks/backdoorbench_records.py / backdoorbench_d3.py sets
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and aliases np.infty etc. (nothing in their files is edited).
set -euo pipefail
VENV="${1:-/work/bbenv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
# CPU wheels of torch; the versions this project measured with.
"$VENV/bin/python" -m pip install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
# What BackdoorBench's attack/defense scripts and utils import.
"$VENV/bin/python" -m pip install \
    numpy pandas scipy imageio kornia pytorch_wavelets PyWavelets scikit-image \
    opencv-python-headless 'setuptools<81' tqdm pyyaml matplotlib seaborn pillow \
    scikit-learn einops termcolor easydict tensorboard torchmetrics timm jsonschema psutil
"$VENV/bin/python" - <<'PY'
import torch, torchvision, numpy, pandas, kornia, pytorch_wavelets, cv2, skimage, yaml
print("torch", torch.__version__, "torchvision", torchvision.__version__, "numpy", numpy.__version__)
PY
echo "BackdoorBench venv ready: $VENV/bin/python"
