#!/usr/bin/env bash
# Run a training script on every GPU of this machine (NCCL), or on N CPU processes (Gloo) where there is none.
#
# Usage: launch/torchrun.sh [--nproc N] [--cpu] [torchrun options] SCRIPT [SCRIPT ARGS...]
#
#   --nproc N       processes on this node (variable NPROC). Default: one per GPU; 2 on a machine without GPU.
#   --cpu           ignore the GPUs: N CPU processes on Gloo (variable SYNCNORM_CPU=1).
#   --dry-run       print the torchrun command instead of running it.
#   torchrun options (before SCRIPT) pass through to `python -m torch.distributed.run`, e.g. for two nodes:
#       --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500       (static, one line per node)
#       --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB (elastic rendezvous)
#   The usual variables NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT do the same when NNODES > 1.
#   PYTHON picks the interpreter (default: python, else python3).
#
# The scripts choose their backend from the device they find (CUDA: NCCL; CPU: Gloo), so nothing else changes.
# Examples:
#   launch/torchrun.sh examples/train_digits.py
#   launch/torchrun.sh --nproc 4 examples/train_digits.py --steps 300
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
# Options that say where the rendezvous is: with any of them, no --standalone.
is_rendezvous() { [[ "$1" =~ ^--(master|rdzv|node)[-_] ]]; }

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(command -v python || command -v python3) || die "no python on PATH; set PYTHON=/path/to/python"
fi

nproc="${NPROC:-}"
force_cpu="${SYNCNORM_CPU:-0}"
dry_run=0
nnodes=""
rendezvous_given=0
passthrough=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc|--nproc-per-node|--nproc_per_node) [[ $# -ge 2 ]] || die "$1 expects a number"; nproc="$2"; shift 2 ;;
        --nproc=*|--nproc-per-node=*|--nproc_per_node=*) nproc="${1#*=}"; shift ;;
        --cpu) force_cpu=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --nnodes) [[ $# -ge 2 ]] || die "--nnodes expects a number"; nnodes="$2"; shift 2 ;;
        --nnodes=*) nnodes="${1#*=}"; shift ;;
        # torchrun's options that take no value.
        --standalone|--no-python|--no_python|--run-path|--run_path|-m|--module) passthrough+=("$1"); shift ;;
        --*=*) passthrough+=("$1"); is_rendezvous "${1%%=*}" && rendezvous_given=1; shift ;;
        -*) [[ $# -ge 2 ]] || die "$1 expects a value"; passthrough+=("$1" "$2"); is_rendezvous "$1" && rendezvous_given=1
            shift 2 ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; die "expected a training script, e.g. launch/torchrun.sh examples/train_digits.py"; }

# The usual variables, as set by cluster schedulers, when the flags did not say otherwise.
if [[ -z "$nnodes" && -n "${NNODES:-}" ]]; then nnodes="$NNODES"; fi
if [[ -n "$nnodes" && "$nnodes" != "1" && $rendezvous_given -eq 0 ]]; then
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$nnodes needs MASTER_ADDR (the first node) or --rdzv-endpoint HOST:PORT"
    passthrough+=(--node-rank "${NODE_RANK:-0}" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
fi

gpus=0
if [[ "$force_cpu" != "1" ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # The driver sees GPUs; ask torch how many this build can use (CUDA_VISIBLE_DEVICES included).
    gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
fi

if [[ "$gpus" -gt 0 ]]; then
    nproc="${nproc:-$gpus}"
    [[ "$nproc" -le "$gpus" ]] || die "--nproc $nproc asks for more processes than the $gpus GPUs here (NCCL needs one GPU a process); use --cpu to run on Gloo"
    echo "launch/torchrun.sh: $gpus GPU(s) found: $nproc process(es) on this node, one GPU each, on NCCL"
else
    nproc="${nproc:-2}"
    # The scripts pick Gloo because they see no CUDA device.
    [[ "$force_cpu" == "1" ]] && export CUDA_VISIBLE_DEVICES=""
    cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    threads=$(( cores / nproc )); [[ $threads -ge 1 ]] || threads=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
    reason=$([[ "$force_cpu" == "1" ]] && echo "--cpu" || echo "no GPU found")
    echo "launch/torchrun.sh: $reason: $nproc CPU process(es) on this node on Gloo, $OMP_NUM_THREADS thread(s) each (--nproc N or NPROC=N to change)"
fi

if [[ -n "$nnodes" && "$nnodes" != "1" ]]; then
    echo "launch/torchrun.sh: node of $nnodes, torchrun options: ${passthrough[*]}"
    passthrough=(--nnodes "$nnodes" ${passthrough[@]+"${passthrough[@]}"})
elif [[ $rendezvous_given -eq 0 ]]; then
    # One node: a free local port, so several jobs on one machine never collide.
    passthrough=(--standalone ${passthrough[@]+"${passthrough[@]}"})
fi

cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$nproc" ${passthrough[@]+"${passthrough[@]}"} "$@")
if [[ $dry_run -eq 1 ]]; then echo "${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
