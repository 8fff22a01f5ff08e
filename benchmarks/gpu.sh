#!/usr/bin/env bash
# Every GPU check, as one command for a machine with one GPU (aimed at about 8 minutes on one H200):
#   1. check_cuda:  the CUDA path against the float64 reference (benchmarks/check_cuda.py)
#   2. cuda-tests:  every test with "cuda" in its name or module (pytest -k cuda): tests/test_cuda_graphs.py too
#   3. fused:       the same with SYNCNORM_KERNELS=fused (the kernel backends' switch: auto|native|fused)
#   4. equivalence: the multi-rank equivalence tests with CUDA visible (CUDA tensors over Gloo, ranks sharing GPU 0)
#   5. selftest:    python -m syncnorm.selftest on 1 NCCL rank, then on 2 ranks with CUDA tensors over Gloo
#   6. bench-layer: per layer vs cuDNN BatchNorm and torch's SyncBatchNorm Function, bandwidth vs the card's peak
#   7. bench-model: ResNet-50 training step, eager and CUDA-graphed, syncnorm vs torch SyncBatchNorm vs local BN
#   8. suite:       the whole pytest suite with CUDA visible (last: the longest, the least GPU-specific)
# Each step has its own timeout (a hang costs that step only) and its status in the summary table at the end.
# Run from the repository root:  bash benchmarks/gpu.sh   (PY=/path/to/python picks the interpreter;
# STEPS="check_cuda selftest" runs some steps only). Everything printed goes to ${OUT:-out/gpu}/gpu-results.txt (out/ is git-ignored),
# and the selftest and benchmark JSON files beside it. Exit status: 0 when every step passed.
set -uo pipefail
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=${OUT:-out/gpu}
mkdir -p "$DEST"
RESULTS=$DEST/gpu-results.txt
STEPS=${STEPS:-"check_cuda cuda-tests fused equivalence selftest bench-layer bench-model suite"}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
summary=()
status=0

# step NAME TIMEOUT_S COMMAND...: run it under its timeout (killing its whole process group), record the result.
step() {
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo; echo "== $name (timeout ${limit} s): $*"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@"; rc=$?
  # pytest: 5 = no tests collected (fine for a filter that matches nothing on this checkout).
  local verdict=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    verdict="TIMEOUT"
  elif [[ $rc -ne 0 ]] && ! [[ $rc -eq 5 && "$*" == *pytest* ]]; then
    verdict="FAILED ($rc)"
  fi
  [[ $verdict == ok ]] || status=1
  summary+=("| $name | $verdict | $((SECONDS - start)) |")
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"

  step check_cuda 150 "$PY" benchmarks/check_cuda.py
  step cuda-tests 180 "${PYTEST[@]}" tests -k cuda
  step fused 180 env SYNCNORM_KERNELS=fused "${PYTEST[@]}" tests -k cuda
  step equivalence 240 "${PYTEST[@]}" tests/test_equivalence.py
  step selftest 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m syncnorm.selftest \
       --json "$DEST/selftest-nccl-1rank.json"
  step selftest 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m syncnorm.selftest \
       --backend gloo --quick --json "$DEST/selftest-gloo-cuda-2ranks.json"
  step bench-layer 150 "$PY" benchmarks/bench_gpu.py --part layer --iters 40 --warmup 10 --json "$DEST/bench-layer.json"
  step bench-model 180 "$PY" benchmarks/bench_gpu.py --part model --model-iters 20 --json "$DEST/bench-model.json"
  step suite 240 "${PYTEST[@]}" tests -x

  echo; echo "| step | result | seconds |"; echo "|---|---|---|"
  printf '%s\n' "${summary[@]}"
  echo "gpu.sh exit status: $status"
  exit $status
} 2>&1 | tee "$RESULTS"
exit "${PIPESTATUS[0]}"
