#!/usr/bin/env bash
# The ten-minute GPU check (issue 30; docs/gpu.md): what a maintainer with an NVIDIA GPU runs before a release.
#
#   bash benchmarks/gpu_check.sh [WORK]        (default /tmp/d3_gpu_check; D3_GPU_CHECK_DEVICE=cuda:1 picks a GPU)
#
# D3_GPU_CHECK_DEVICE=cpu D3_GPU_CHECK_MODEL=small_cnn rehearses the GPU path on a CPU (the script's own
# plumbing: the cuda tests skip, fp16 is the refused precision there).
#
# One line per check, PASS / FAIL / SKIP with the reason, then a summary; exit 1 when a check failed, else 0.
# Each check's output is in WORK/<check>.log. Checks: versions and compute capability; the `cuda`-marked tests;
# a small PreAct-ResNet18 BadNets record (Fashion-MNIST, 2,000 images, 2 epochs); `defend` (D3) at every
# precision (bf16 must be refused on a GPU without native bf16); a GPU index that does not exist (one line,
# exit 2); a `defend` killed after its first epoch and continued with --resume; `compare` over every native
# defense; `detect`; the throughput and precision benchmarks; a grid on the local pool (two workers: one per
# GPU when there are several) and on Ray (tasks ask for a GPU). On a machine without a GPU every GPU check is
# skipped, with the reason, and the script exits 0.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/.venv/bin"; PY="${PYTHON:-$BIN/python}"; D3=("$PY" -m d3_plugin.cli)
WORK="${1:-/tmp/d3_gpu_check}"; DEVICE="${D3_GPU_CHECK_DEVICE:-cuda}"; MODEL="${D3_GPU_CHECK_MODEL:-preactresnet18}"
RECORD="$WORK/checkout/record/badnets_$MODEL"
mkdir -p "$WORK"
passed=0; failed=0; skipped=0

say() {  # STATUS CHECK DETAIL
  printf '%-4s  %-26s %s\n' "$1" "$2" "$3"
  case "$1" in PASS) passed=$((passed + 1)) ;; FAIL) failed=$((failed + 1)) ;; *) skipped=$((skipped + 1)) ;; esac
}

run() {  # CHECK COMMAND...: PASS when the command exits 0 (its output in WORK/CHECK.log)
  local check="$1"; shift
  if "$@" > "$WORK/$check.log" 2>&1; then say PASS "$check" "$(grep -v '^[[:space:]|-]*$' "$WORK/$check.log" | tail -n 1 | cut -c1-90)"
  else say FAIL "$check" "exit $?; see $WORK/$check.log"; fi
}

refused() {  # CHECK PATTERN COMMAND...: PASS when the command exits 2 with one stderr line matching PATTERN
  local check="$1" pattern="$2"; shift 2
  "$@" > "$WORK/$check.log" 2> "$WORK/$check.err"; local status=$?
  if [ "$status" = 2 ] && [ "$(wc -l < "$WORK/$check.err")" = 1 ] && grep -q -- "$pattern" "$WORK/$check.err"; then
    say PASS "$check" "$(cut -c1-90 "$WORK/$check.err")"
  else say FAIL "$check" "exit $status, wanted 2 and one line matching '$pattern'; see $WORK/$check.err"; fi
}

gpu_facts() {  # prints: count capability native_bf16 (or the reason there is no GPU, on stderr, exit 1)
  "$PY" - "$DEVICE" <<'EOF'
import sys
import torch
if sys.argv[1] == "cpu":  # the rehearsal
    print(torch.cuda.device_count(), "cpu", 0)
elif not torch.cuda.is_available():
    built = torch.version.cuda
    sys.exit(f"no CUDA GPU: torch {torch.__version__} " + (f"(CUDA {built}) sees none (driver, or "
             f"CUDA_VISIBLE_DEVICES?)" if built else "is a CPU-only build"))
else:
    major, minor = torch.cuda.get_device_capability(torch.device(sys.argv[1]))
    print(torch.cuda.device_count(), f"{major}.{minor}", int((major, minor) >= (8, 0)))
EOF
}

# --- versions (runs everywhere) ---
if "$PY" -c "import sys, torch, d3_plugin; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, \
CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, d3_plugin {d3_plugin.__version__}'); \
[print(f'cuda:{i}: {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}') \
for i in range(torch.cuda.device_count())]" > "$WORK/versions.log" 2>&1; then
  say PASS versions "$(head -n 1 "$WORK/versions.log")"
else say FAIL versions "see $WORK/versions.log"; fi

if facts="$(gpu_facts 2> "$WORK/gpu.err")"; then
  read -r COUNT CAPABILITY NATIVE_BF16 <<< "$facts"
  say PASS gpu "$COUNT GPU(s); $DEVICE: compute capability $CAPABILITY (native bf16: $NATIVE_BF16)"
else
  REASON="$(tail -n 1 "$WORK/gpu.err")"
  for check in cuda-tests record "defend --precision "{auto,bf16,fp16,fp32} bad-device-index kill-and-resume \
               compare-native detect throughput precision-benchmark grid-local-pool grid-ray; do
    say SKIP "$check" "$REASON"
  done
  echo "summary: $passed passed, $failed failed, $skipped skipped (no GPU here); logs in $WORK"
  exit 0
fi

run cuda-tests "$PY" -m pytest -q -m cuda -p no:cacheprovider "$ROOT/tests/test_cuda.py"

if [ -f "$RECORD/attack_result.pt" ] || "${D3[@]}" attack badnets --model "$MODEL" --dataset fashion_mnist \
     --train-size 2000 --epochs 2 --device "$DEVICE" --out "$RECORD" > "$WORK/record.log" 2>&1; then
  say PASS record "$RECORD"
else
  say FAIL record "see $WORK/record.log (Fashion-MNIST: apt-get install dataset-fashion-mnist)"
  for check in "defend --precision "{auto,bf16,fp16,fp32} bad-device-index kill-and-resume compare-native detect \
               grid-local-pool grid-ray; do say SKIP "$check" "no record"; done
  run throughput "$PY" "$ROOT/benchmarks/throughput.py" --device "$DEVICE" --rounds 2
  echo "summary: $passed passed, $failed failed, $skipped skipped; logs in $WORK"; exit 1
fi

DEFEND=("${D3[@]}" defend --result_file "$RECORD" --ratio 0.05 --epochs 2)
refusal=(bf16 "native bf16"); [ "$DEVICE" = cpu ] && refusal=(fp16 "needs a CUDA device")
for precision in auto bf16 fp16 fp32; do
  if [ "$precision" = "${refusal[0]}" ] && { [ "$NATIVE_BF16" = 0 ] || [ "$precision" = fp16 ]; }; then
    refused "defend --precision $precision" "${refusal[1]}" "${DEFEND[@]}" --device "$DEVICE" --precision "$precision"
  else run "defend --precision $precision" "${DEFEND[@]}" --device "$DEVICE" --precision "$precision"; fi
done

missing="names GPU $COUNT"; [ "$COUNT" = 0 ] && missing="CUDA is not available"
refused bad-device-index "$missing" "${DEFEND[@]}" --device "cuda:$COUNT,$((COUNT + 1))"

resume_file="$RECORD/defense/.d3.resume.pt"; rm -f "$resume_file"
"${DEFEND[@]}" --device "$DEVICE" --epochs 6 > "$WORK/kill-and-resume.log" 2>&1 & pid=$!
for _ in $(seq 600); do [ -f "$resume_file" ] || ! kill -0 "$pid" 2> /dev/null && break; sleep 0.5; done
kill -9 "$pid" 2> /dev/null; wait "$pid" 2> /dev/null
if [ -f "$resume_file" ] && "${DEFEND[@]}" --device "$DEVICE" --epochs 6 --resume True >> "$WORK/kill-and-resume.log" 2>&1 \
   && grep -q "resuming from" "$WORK/kill-and-resume.log" && [ ! -f "$resume_file" ]; then
  say PASS kill-and-resume "killed after its first epoch, resumed from $resume_file, finished"
else say FAIL kill-and-resume "see $WORK/kill-and-resume.log"; fi

native="$("$PY" -c "from d3_plugin import registry; print(','.join(sorted(e.name for e in registry.list_entries() \
if e.where == 'native' and e.data != 'poisoned')))")"
run compare-native "${D3[@]}" compare --result_file "$RECORD" --defenses "$native" --epochs 1 --device "$DEVICE" \
    --out "$WORK/compare"
run detect "${D3[@]}" detect --result_file "$RECORD" --device "$DEVICE" --out "$WORK/detect"
run throughput "$PY" "$ROOT/benchmarks/throughput.py" --device "$DEVICE" --rounds 2
variants="fp32,fp32+cl,bf16+cl,bf16+cl+fold"; [ "$NATIVE_BF16" = 1 ] || variants="fp32,fp32+cl,fp16+cl"
[ "$DEVICE" = cpu ] && variants="fp32,fp32+cl"
run precision-benchmark "$PY" "$ROOT/benchmarks/precision.py" --device "$DEVICE" --rounds 2 --variants "$variants"

cat > "$WORK/grid.yaml" <<EOF
seeds: [0, 1]
epochs: 1
ratio: 0.05
device: auto
attacks:
  - record: $RECORD
defenses: [d3, ft]
EOF
run grid-local-pool "${D3[@]}" grid "$WORK/grid.yaml" --workers 2 --out "$WORK/grid-pool"
if "$PY" -c "import ray" 2> /dev/null; then
  run grid-ray "${D3[@]}" grid "$WORK/grid.yaml" --executor ray --out "$WORK/grid-ray"
else say SKIP grid-ray "Ray is not installed (pip install 'd3-plugin[ray]')"; fi

echo "summary: $passed passed, $failed failed, $skipped skipped; logs in $WORK"
[ "$failed" = 0 ]
