"""``python -m syncnorm.selftest``: is syncnorm exact and fast on this machine, with this launcher?

Run it alone, and it starts its own ranks (one per GPU on NCCL; without GPU, 2 CPU processes on Gloo), or
run it on every rank of a job, exactly as a training script::

    syncnorm-selftest --quick                    # or python -m syncnorm.selftest: starts 2 or more ranks
    syncnorm-run -m syncnorm.selftest --quick    # the same through the launcher (launch/torchrun.sh too)
    python -m torch.distributed.run --standalone --nproc-per-node 8 -m syncnorm.selftest   # or torchrun
    launch/mpirun.sh -n 2 syncnorm/selftest.py --quick

Devices and backend follow the job: CUDA tensors over NCCL (one GPU a rank, ``LOCAL_RANK``), CPU tensors
over Gloo without GPU, CUDA tensors over Gloo with ``--backend gloo`` (several ranks may then share a GPU).

Part 1, exactness: each case runs a training step of syncnorm on every rank, gathers every rank's input
and results, and compares them with float64 ``torch.nn.BatchNorm`` in one process on the concatenated
global batch (outputs and input gradients by slice, parameter gradients summed over ranks, running
statistics on every rank), to the tolerance of the input dtype. Part 2, speed: forward+backward of one
layer, syncnorm vs local BatchNorm vs ``torch.nn.SyncBatchNorm``, median of repeated steps on the slowest
rank. Rank 0 prints one markdown table per part. Every rank exits with status 1 if any case fails on any
rank (the verdict is all-reduced), and a group that cannot form, or a collective that never completes,
ends the process with a message and status 1 within ``--timeout`` seconds instead of hanging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

# Absolute imports: launch/mpirun.sh runs this file as a script (runpy.run_path), not as a module.
from syncnorm._selftest import CASES, Context, Result, Watchdog, gather_objects, run_case, run_speed


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m syncnorm.selftest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer speed shapes and repetitions (about 1 minute)")
    parser.add_argument("--json", metavar="FILE", help="also write every result to FILE (rank 0)")
    parser.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                        help="auto: NCCL for CUDA tensors, Gloo for CPU tensors; gloo: also for CUDA tensors")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available (GPU LOCAL_RANK), else CPU")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds to form the process group, and for each case, before giving up (default 120)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed part")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per variant (default 30, --quick 8)")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="ranks to start when run alone, 2 or more (default: one per GPU; 2 CPU processes "
                        "without GPU); under a launcher, the launcher's count")
    return parser.parse_args(argv)


def choose_device(choice: str) -> torch.device:
    """The device of this rank: CUDA device LOCAL_RANK (modulo the GPUs seen) or the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("syncnorm.selftest: --device cuda, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu.")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def choose_backend(choice: str, device: torch.device) -> str:
    """NCCL for CUDA tensors, Gloo for CPU tensors, unless ``--backend`` says otherwise."""
    if choice == "nccl" and device.type != "cuda":
        raise SystemExit("syncnorm.selftest: --backend nccl needs CUDA tensors, but this rank runs on the CPU; "
                         "use --backend gloo (or auto).")
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return choice


def init_group(backend: str, device: torch.device, timeout_s: float, watchdog: Watchdog) -> str:
    """Join the job's process group (torchrun's or MPI's variables); return how."""
    where = (f"env:// (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}, "
             f"MASTER_ADDR={os.environ.get('MASTER_ADDR', '?')}, MASTER_PORT={os.environ.get('MASTER_PORT', '?')})")
    kwargs: dict[str, Any] = {"init_method": "env://"}
    if backend == "nccl":
        kwargs["device_id"] = device
    watchdog.arm(timeout_s + 15, f"forming the {backend} process group via {where}")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        # A first collective: with some backends init returns before every rank has connected.
        flag = torch.ones(1, device=device)
        dist.all_reduce(flag)
    except Exception as error:  # noqa: BLE001 - any failure to form the group ends the run the same way
        print(f"syncnorm.selftest: could not form the {backend} process group via {where} within "
              f"{timeout_s:.0f} s: {type(error).__name__}: {error}\nCheck that every rank was started and "
              "can reach MASTER_ADDR:MASTER_PORT, or raise --timeout.", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    watchdog.disarm()
    return where


def environment(device: torch.device, backend: str, where: str) -> dict[str, Any]:
    """Versions and every rank's device, for the header (a collective: every rank calls it)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    devices = gather_objects(f"{socket.gethostname()} {device} {name}", device)
    nccl = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a build without NCCL
            nccl = None
    import syncnorm

    return {"world_size": dist.get_world_size(), "backend": backend, "group": where, "devices": devices,
            "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "syncnorm": syncnorm.__version__, "python": platform.python_version()}


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_report(env: dict[str, Any], results: list[Result], speed: list[dict[str, Any]],
                  speed_note: str) -> str:
    """The markdown printed by rank 0."""
    out = [f"## syncnorm self-test: world size {env['world_size']}, backend {env['backend']}",
           f"torch {env['torch']}, CUDA {env['cuda']}, NCCL {env['nccl']}, syncnorm {env['syncnorm']}, "
           f"Python {env['python']}; group: {env['group']}", "", "Devices: " + "; ".join(
               f"rank {r}: {d}" for r, d in enumerate(env["devices"])), "",
           "### Exactness (vs float64 torch BatchNorm in one process on the gathered global batch)", ""]
    rows = [(r.name, r.shapes, r.dtype, "-" if r.max_error is None else f"{r.max_error:.2e}", r.tolerance,
             "-" if r.ratio is None else f"{r.ratio:.3f}", r.verdict) for r in results]
    out.append(_table(("case", "batch per rank", "dtype", "max abs error", "tolerance",
                       "error / allowed", "result"), rows))
    if speed:
        out += ["", f"### Speed (forward+backward of one training-mode layer; {speed_note})", ""]
        srows = [(s["shape"], s["dtype"], *[s["ms"].get(v, s["notes"].get(v, "-")) for v in s["variants"]],
                  s["ratio"]) for s in speed]
        header = ("shape per rank", "dtype", *[f"{v} ms" for v in speed[0]["variants"]], "syncnorm / local")
        out.append(_table(header, srows))
        notes = sorted({n for s in speed for n in s["reasons"].values()})
        out += [f"- {n}" for n in notes]
        out.append("- syncnorm / local: syncnorm's time over local BatchNorm's, which communicates nothing. syncnorm "
                   "without communication: the same layer in a process group of its own rank alone; the difference "
                   "to syncnorm is communication (2 all-reduces, and each rank's wait in them for the slowest rank).")
        shares = [s["communication_share"] for s in speed]
        if env["backend"] == "gloo" and speed_note.endswith(", cpu") and env["world_size"] > 1:
            low, high = f"{min(shares):.0%}", f"{max(shares):.0%}"
            span = low if low == high else f"{low} to {high}"
            lead = ("this ratio measures Gloo more than syncnorm's arithmetic: " if min(shares) >= 0.5 else "")
            out.append(f"- On CPU ranks {lead}communication over Gloo (loopback TCP between processes that share "
                       f"this machine's cores) is {span} of syncnorm's time; its own work is the column without "
                       "communication.")
    failed = [r.name for r in results if r.verdict == "FAIL"]
    out += ["", f"**{'FAILED: ' + ', '.join(failed) if failed else 'PASSED'}**"]
    return "\n".join(out)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line for the ranks: ``--nproc`` is for starting them."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _launch_ranks(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run alone: start the self-check on 2 or more local ranks through ``syncnorm-run``; its exit status.

    A check of one process tests no communication, so a count below 2 is refused with the way to run it.
    """
    from syncnorm import launch

    prog = "syncnorm.selftest"
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    gpus = 0 if cpu else torch.cuda.device_count()
    nproc = args.nproc if args.nproc is not None else (gpus or 2)
    fix = ""
    if nproc < 2 and args.nproc is not None:
        fix = (f"--nproc {nproc}: a self-check of communication needs 2 ranks or more. One process alone: "
               "syncnorm-run --nproc 1 -m syncnorm.selftest")
    elif nproc < 2:
        fix = (f"{gpus} GPU here, and NCCL needs one GPU a rank: a self-check of communication needs 2. Run it on 2 "
               "CPU ranks (syncnorm-selftest --device cpu), with CUDA tensors over Gloo on this GPU "
               "(python -m torch.distributed.run --standalone --nproc-per-node 2 -m syncnorm.selftest --backend "
               "gloo), or as one NCCL rank that communicates nothing (syncnorm-run --nproc 1 -m syncnorm.selftest)")
    elif not cpu and args.backend == "gloo" and nproc > gpus:
        fix = (f"--nproc {nproc} with CUDA tensors over Gloo on {gpus} GPU(s): start the ranks with "
               f"python -m torch.distributed.run --standalone --nproc-per-node {nproc} -m syncnorm.selftest "
               "--backend gloo")
    if fix:
        print(f"{prog}: {fix}", file=sys.stderr, flush=True)
        return 2
    options = ["--nproc", str(nproc), *(["--cpu"] if args.device == "cpu" else [])]
    print(f"{prog}: not started by a launcher: starting {nproc} rank(s) (syncnorm-run {' '.join(options)} "
          "-m syncnorm.selftest)", flush=True)
    return launch.run([*options, "-m", "syncnorm.selftest", *_without_nproc(argv)], prog=prog)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the self-test on this rank; return the exit status (the same on every rank).

    Every rank of the job calls it, as ``python -m syncnorm.selftest`` does: it joins the job's process
    group (torchrun's or MPI's variables), runs the exactness cases and the speed part, prints the report
    on rank 0, and destroys the group. Called alone (no ``RANK``/``WORLD_SIZE`` in the environment), it
    starts the job itself: ``--nproc`` ranks through ``syncnorm-run``, one per GPU, or 2 CPU processes.

    Args:
        argv: the command-line options (``--quick``, ``--json FILE``, ``--backend auto|nccl|gloo``,
            ``--device auto|cuda|cpu``, ``--timeout S``, ``--no-speed``, ``--iters N``, ``--nproc N``);
            default ``sys.argv[1:]``.

    Returns:
        0 when every case passed on every rank, 1 when any failed on any rank (the ranks all-reduce
        the verdict); run alone, the status of the job it started, 2 for fewer than 2 ranks.

    Raises:
        SystemExit: a device or backend that this rank cannot use (``--device cuda`` without CUDA,
            ``--backend nccl`` on CPU), or a process group that did not form within ``--timeout``.
            An error during the cases ends the process with status 1 instead of raising, so that the
            other ranks fail too rather than wait.

    Example:
        >>> import syncnorm.selftest
        >>> status = syncnorm.selftest.main(["--quick", "--no-speed"])  # alone: it starts 2 ranks or more
        >>> status
        0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return _launch_ranks(args, argv)
    watchdog = Watchdog()
    device = choose_device(args.device)
    backend = choose_backend(args.backend, device)
    where = init_group(backend, device, args.timeout, watchdog)
    rank = dist.get_rank()
    try:
        watchdog.arm(args.timeout, "gathering the environment")
        env = environment(device, backend, where)
        ctx = Context(device=device, rank=rank, world_size=dist.get_world_size(), backend=backend,
                      quick=args.quick)
        results = []
        for case in CASES:
            watchdog.arm(args.timeout, f"exactness case '{case.name}'")
            results.append(run_case(case, ctx))
        speed: list[dict[str, Any]] = []
        speed_note = ""
        if not args.no_speed:
            watchdog.arm(args.timeout * 4, "the speed part")
            speed, speed_note = run_speed(ctx, args.iters)
        # The verdict: a mismatch seen by any rank fails every rank.
        watchdog.arm(args.timeout, "agreeing on the verdict")
        failed = torch.tensor([float(any(r.verdict == "FAIL" for r in results))], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        status = 1 if failed.item() > 0.5 else 0
        watchdog.disarm()
        if rank == 0:
            print(format_report(env, results, speed, speed_note), flush=True)
            if status and not any(r.verdict == "FAIL" for r in results):
                print("**FAILED on another rank** (its results differ from rank 0's: see its output)", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"environment": env, "exactness": [r.as_dict() for r in results], "speed": speed,
                               "speed_note": speed_note, "passed": status == 0}, f, indent=2)
        elif status and any(r.verdict == "FAIL" for r in results):
            print(f"syncnorm.selftest rank {rank}: FAILED: "
                  + ", ".join(f"{r.name} (error/allowed {r.ratio})" for r in results if r.verdict == "FAIL"),
                  file=sys.stderr, flush=True)
    except Exception:
        # One rank failing alone would leave the others waiting in a collective: end this process now, so
        # theirs fails too (a closed peer), or their watchdog ends them.
        import traceback

        traceback.print_exc()
        print(f"syncnorm.selftest rank {rank}: error (above); exiting with status 1", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()
    return status


def console_main() -> None:
    """Entry point of the ``syncnorm-selftest`` console script: ``main()``, then exit with its status.

    The process ends here, with ``main()``'s status (0 passed, 1 failed), through ``os._exit`` after
    flushing the output: nothing after it runs.

    Example:
        >>> # torchrun --nproc-per-node 2 -m syncnorm.selftest  (exit status 0: passed)
    """
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The verdict is final once the process group is destroyed. The interpreter's teardown after it can
    # abort a Gloo rank ("terminate called without an active exception": a C++ thread of torch.distributed
    # destroyed while still joinable; seen in about 1 run in 6 on 3 CPU ranks, with the previous release
    # too), which would turn a pass into a crash: leave without that teardown.
    os._exit(status)


if __name__ == "__main__":
    console_main()
