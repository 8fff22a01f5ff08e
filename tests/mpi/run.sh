#!/usr/bin/env bash
# The MPI lane on N ranks: mpirun -n N python -m pytest --with-mpi tests/mpi, failing unless all N ranks ran tests.
# Usage: tests/mpi/run.sh N   (PYTHON and MPIRUN pick the interpreter and mpirun; default: those of .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
n="${1:?usage: tests/mpi/run.sh N (number of MPI ranks, at least 2)}"
PYTHON="${PYTHON:-.venv/bin/python}"
MPIRUN="${MPIRUN:-$(dirname "$PYTHON")/mpirun}"
notes=$(mktemp -d)
trap 'rm -rf "$notes"' EXIT
export SYNCNORM_MPI_SIZE="$n" SYNCNORM_MPI_REPORT_DIR="$notes" OMP_NUM_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# timeout: a rank stuck in a collective must end the lane, never hang CI (each test also has pytest-timeout).
cmd=(timeout --kill-after=10 300 "$MPIRUN" --allow-run-as-root --oversubscribe -n "$n"
     -x SYNCNORM_MPI_SIZE -x SYNCNORM_MPI_REPORT_DIR -x OMP_NUM_THREADS -x PYTHONPATH
     "$PYTHON" -m pytest --with-mpi -p no:cacheprovider -q tests/mpi)
echo "${cmd[*]}"
status=0
"${cmd[@]}" || status=$?
ranks=$( (grep -l "size=$n passed=[1-9][0-9]* problem=$" "$notes"/rank* 2>/dev/null || true) | wc -l)
if [[ $status -ne 0 || $ranks -ne $n ]]; then
    echo "MPI lane on $n ranks FAILED: mpirun exit status $status (5: no test collected, 124: timeout);" \
         "$ranks of $n ranks ran and passed tests" >&2
    cat "$notes"/rank* >&2 2>/dev/null || true
    exit 1
fi
echo "MPI lane on $n ranks: every rank ran and passed its tests"
