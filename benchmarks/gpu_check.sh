#!/usr/bin/env bash
# Every GPU measurement of BGN's CUDA path and the CUDA tests, in one go: about 5 min on one H200,
# at most 7 min 55 s (the sum of the steps' limits).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]     (default: $OUT, else benchmarks/gpu_results)
#
# Steps, each with its own time limit so that one slow step cannot eat the others' time:
#   1. environment: GPU, driver, torch / Triton versions, which BGN path CUDA runs;
#   2. tests: tests/test_cuda_kernels.py (compiled kernels on the GPU, and the interpreter suite)
#      and the CUDA autocast tests of tests/test_precision.py;
#   3. benchmarks/norm_speed.py --device cuda: BN (cuDNN) vs GN vs BGN (Triton kernels) vs BGN
#      (native-op path), train and eval, contiguous and channels-last, float32, the suite's shapes
#      and ResNet-50's stage shapes at batch 2 / 32 / 128; then the quick suite in bfloat16;
#   4. benchmarks/model_step.py --device cuda --native: ResNet-50 training steps at batch 2 and 32
#      with bn / bgn / gn, float32 contiguous and bfloat16-autocast channels-last, Triton kernels
#      and (second process) native path.
# Results (JSON, markdown, logs) go to OUTPUT_DIR; summary.txt lists each step's exit status.
# The script does not stop at a failed step; its exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=${1:-${OUT:-benchmarks/gpu_results}}
mkdir -p "$DIR"
SUMMARY="$DIR/summary.txt"
: > "$SUMMARY"
failed=0
start=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run, log to NAME.log, record the status and the time
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$DIR/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$DIR/$name.log" 2>&1
  local rc=$?
  local msg="$name: exit $rc, $(( $(date +%s) - t0 )) s"
  [ "$rc" -eq 124 ] && msg="$msg (timed out)"
  echo "$msg" | tee -a "$SUMMARY"
  [ "$rc" -ne 0 ] && failed=1
  tail -n 3 "$DIR/$name.log"
}

step environment 30 "$PY" -c "
import torch, triton, bgn_lightning
from bgn_lightning._triton import cuda_kernels_available
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print('BGN CUDA path:', 'Triton kernels' if cuda_kernels_available() else 'native ops')
"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$DIR/environment.log" 2>&1
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device here: nothing to measure (see $DIR/environment.log)" | tee -a "$SUMMARY"
  exit 2
fi

step tests 120 "$PY" -m pytest -q -p no:cacheprovider -ra tests/test_cuda_kernels.py \
  "tests/test_precision.py::test_cuda_autocast_matches_float32_run"

step norm_speed_fp32 150 "$PY" benchmarks/norm_speed.py --device cuda --budget 0.25 \
  --json "$DIR/norm_speed_cuda_fp32.json" --markdown "$DIR/norm_speed_cuda_fp32.md"

step norm_speed_bf16 45 "$PY" benchmarks/norm_speed.py --device cuda --quick --dtype bfloat16 \
  --json "$DIR/norm_speed_cuda_bf16.json" --markdown "$DIR/norm_speed_cuda_bf16.md"

step model_step_fp32 65 "$PY" benchmarks/model_step.py --device cuda --native --rounds 5 --block 0.2 \
  --json "$DIR/model_step_cuda_fp32.json"

step model_step_bf16_cl 65 "$PY" benchmarks/model_step.py --device cuda --native --rounds 5 --block 0.2 \
  --channels-last --amp bfloat16 --json "$DIR/model_step_cuda_bf16_cl.json"

echo "total: $(( $(date +%s) - start )) s" | tee -a "$SUMMARY"
exit "$failed"
