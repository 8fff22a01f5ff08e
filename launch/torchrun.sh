#!/usr/bin/env bash
# Run a training script on every GPU of this machine (NCCL), or on N CPU processes (Gloo) where there is none.
#
# Usage: launch/torchrun.sh [--nproc N] [--cpu] [--dry-run] [torchrun options] SCRIPT [SCRIPT ARGS...]
#
# The launcher installed with syncnorm (`syncnorm-run`, or `python -m syncnorm.launch`), run with this
# checkout's syncnorm; `launch/torchrun.sh --help` lists its options. PYTHON picks the interpreter (default:
# python, else python3).
# Examples:
#   launch/torchrun.sh examples/train_digits.py
#   launch/torchrun.sh --nproc 4 examples/train_digits.py --steps 300
set -euo pipefail

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(command -v python || command -v python3) \
        || { echo "launch/torchrun.sh: no python on PATH; set PYTHON=/path/to/python" >&2; exit 2; }
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
SYNCNORM_RUN_PROG=launch/torchrun.sh exec "$PYTHON" -m syncnorm.launch "$@"
