#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (about 2-4 minutes on one H100).
#   1. the CUDA path of syncnorm against the float64 reference (benchmarks/check_cuda.py, exits non-zero on a
#      mismatch) and any CUDA tests of the suite (pytest -k cuda; "no tests collected" is fine);
#   2. the layer benchmark: syncnorm vs torch's SyncBatchNorm Function (1-rank NCCL) vs cuDNN BatchNorm, with
#      achieved bandwidth vs the card's peak (benchmarks/bench_gpu.py).
# Run from the repository root:  bash benchmarks/gpu.sh   (PY=/path/to/python to pick the interpreter)
# Everything printed is also written to ${OUT:-.}/gpu-results.txt.
set -uo pipefail
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RESULTS=${OUT:-.}/gpu-results.txt
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  status=0
  echo "== CUDA path checks"
  timeout 300 "$PY" benchmarks/check_cuda.py || status=1
  timeout 300 "$PY" -m pytest -q -x -k cuda tests -p no:cacheprovider; rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=1
  echo "== GPU layer benchmark"
  timeout 400 "$PY" benchmarks/bench_gpu.py --iters 40 --warmup 10 || status=1
  echo "gpu.sh exit status: $status"
  exit $status
} 2>&1 | tee "$RESULTS"
exit "${PIPESTATUS[0]}"
