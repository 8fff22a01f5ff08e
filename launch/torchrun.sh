#!/usr/bin/env bash
# Run a training script on every GPU of this machine (NCCL), or on N CPU processes (Gloo) where there is none.
#
# Usage: launch/torchrun.sh [--nproc N] [--cpu] [--dry-run] [torchrun options] SCRIPT [SCRIPT ARGS...]
#
#   --nproc N       processes on this node, a positive integer (variable NPROC). Default: one per GPU;
#                   2 on a machine without GPU.
#   --cpu           ignore the GPUs: N CPU processes on Gloo (variable SYNCNORM_CPU=1).
#   --dry-run       print the torchrun command instead of running it.
#   -h, --help      print this help.
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

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
# Options that say where the rendezvous is: with any of them, no --standalone.
is_rendezvous() { [[ "$1" =~ ^--(master|rdzv|node)[-_] ]]; }
is_positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
# torchrun's own options (torch 2.14), without the launcher's. An option not listed is looked up in the
# installed torchrun before it is called unknown (torchrun_kind), so a newer torch's options pass through too.
TORCHRUN_FLAGS="--standalone --no-python --no_python --run-path --run_path -m --module --virtual-local-rank --virtual_local_rank"
TORCHRUN_VALUED="--nnodes --rdzv-backend --rdzv_backend --rdzv-endpoint --rdzv_endpoint --rdzv-id --rdzv_id \
--rdzv-conf --rdzv_conf --max-restarts --max_restarts --monitor-interval --monitor_interval --start-method \
--start_method --event-log-handler --event_log_handler --role --log-dir --log_dir -r --redirects -t --tee \
--log-line-prefix-template --log_line_prefix_template --local-ranks-filter --local_ranks_filter \
--duplicate-stdout-filters --duplicate_stdout_filters --duplicate-stderr-filters --duplicate_stderr_filters \
--node-rank --node_rank --master-addr --master_addr --master-port --master_port --local-addr --local_addr \
--logs-specs --logs_specs --numa-binding --numa_binding --signals-to-handle --signals_to_handle \
--shutdown-timeout --shutdown_timeout"
in_list() { [[ " $2 " == *" $1 "* ]]; }

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=$(command -v python || command -v python3) || die "no python on PATH; set PYTHON=/path/to/python"
fi

# An option not in the lists above, in the installed torchrun's source (a newer torch): it takes a value.
# The source is read, not imported: importing torch costs seconds on a loaded machine.
torchrun_kind() {
    local dir
    dir=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])' \
          2>/dev/null) || return 0
    grep -q -- "\"$1\"" "$dir/distributed/run.py" 2>/dev/null && echo value || true
}
unknown_option() {
    die "unknown option $1 (before the script). Options: --nproc N, --cpu, --dry-run, --help, and torchrun's:" \
        "$(echo "$TORCHRUN_FLAGS $TORCHRUN_VALUED" | tr ' ' '\n' | grep -- '^-' | grep -v '_' | tr '\n' ' ')"
}

nproc="${NPROC:-}"
nproc_from="NPROC"
force_cpu="${SYNCNORM_CPU:-0}"
dry_run=0
nnodes=""
rendezvous_given=0
no_script_file=0  # -m module or --no-python command: the "script" is not a file here
passthrough=()
while [[ $# -gt 0 ]]; do
    option="${1%%=*}"
    case "$1" in
        --) shift; break ;;
        --nproc|--nproc-per-node|--nproc_per_node)
            [[ $# -ge 2 ]] || die "$1 expects a positive integer"; nproc="$2"; nproc_from="$1"; shift 2 ;;
        --nproc=*|--nproc-per-node=*|--nproc_per_node=*) nproc="${1#*=}"; nproc_from="$option"; shift ;;
        --cpu) force_cpu=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --nnodes) [[ $# -ge 2 ]] || die "--nnodes expects a positive integer"; nnodes="$2"; shift 2 ;;
        --nnodes=*) nnodes="${1#*=}"; shift ;;
        -*)
            if in_list "$option" "$TORCHRUN_FLAGS"; then kind=flag
            elif in_list "$option" "$TORCHRUN_VALUED"; then kind=value
            else kind=$(torchrun_kind "$option"); fi
            [[ -n "$kind" ]] || unknown_option "$1"
            case "$option" in -m|--module|--no-python|--no_python) no_script_file=1 ;; esac
            if [[ "$kind" == flag ]]; then
                [[ "$1" != *=* ]] || die "$option takes no value (got $1)"
                passthrough+=("$1"); shift
            elif [[ "$1" == *=* ]]; then
                passthrough+=("$1"); shift
            else
                [[ $# -ge 2 ]] || die "$1 expects a value"
                passthrough+=("$1" "$2"); shift 2
            fi
            is_rendezvous "$option" && rendezvous_given=1 ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; die "expected a training script, e.g. launch/torchrun.sh examples/train_digits.py"; }
if [[ $no_script_file -eq 0 && ! -f "$1" ]]; then
    die "training script $1 not found (from $(pwd)); give the path of a .py file, e.g. examples/train_digits.py"
fi
if [[ -n "$nproc" ]] && ! is_positive_int "$nproc"; then
    die "$nproc_from expects a positive integer (processes on this node), got '$nproc'"
fi
if [[ -z "$nnodes" && -n "${NNODES:-}" ]]; then nnodes="$NNODES"; fi
# torchrun also accepts an elastic range MIN:MAX of nodes.
if [[ -n "$nnodes" ]] && ! [[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
    die "--nnodes (or NNODES) expects a positive integer or a range MIN:MAX, got '$nnodes'"
fi

# The usual variables, as set by cluster schedulers, when the flags did not say otherwise.
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
    [[ "$nproc" -le "$gpus" ]] || die "--nproc $nproc asks for more processes than the $gpus GPUs here (NCCL needs one GPU a process);" \
        "use --nproc $gpus or less (NPROC=$gpus), or --cpu to run on Gloo"
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
