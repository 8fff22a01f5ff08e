"""``syncnorm-run`` (or ``python -m syncnorm.launch``): start a training script on every GPU of this node, or on CPUs.

It is torchrun (``torch.distributed.run``, called in this process) with the choices made for you: one process
per GPU on NCCL; without a GPU (or with ``--cpu``), N CPU processes on Gloo with the cores shared between them;
a free local port on one node; the usual scheduler variables on several. A mistyped option, or a script that
stops with a usage error, ends in one line and exit status 2 instead of torchrun's traceback.

Example:
    syncnorm-run examples/train_digits.py
    syncnorm-run --nproc 4 train.py --epochs 3
    syncnorm-run --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500 train.py
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shlex
import signal
import sys
from argparse import ArgumentParser
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, Optional

USAGE = """\
Run a training script on every GPU of this machine (NCCL), or on N CPU processes (Gloo) where there is none.

Usage: {prog} [--nproc N] [--cpu] [--dry-run] [torchrun options] SCRIPT [SCRIPT ARGS...]

  --nproc N       processes on this node, a positive integer (variable NPROC). Default: one per GPU;
                  2 on a machine without GPU.
  --cpu           ignore the GPUs: N CPU processes on Gloo (variable SYNCNORM_CPU=1).
  --dry-run       print the torchrun command instead of running it.
  -h, --help      print this help.
  torchrun options (before SCRIPT) pass through to `python -m torch.distributed.run`, e.g. for two nodes:
      --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500       (static, one line per node)
      --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB (elastic rendezvous)
  -m MODULE runs a module instead of a script (e.g. -m syncnorm.selftest).
  The usual variables NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT do the same when NNODES > 1.

The scripts choose their backend from the device they find (CUDA: NCCL; CPU: Gloo), so nothing else changes.
Exit status: the script's (the first failing rank's), 2 for a usage error here.
Examples:
  {prog} examples/train_digits.py
  {prog} --nproc 4 examples/train_digits.py --steps 300"""

# A wrapper script (launch/torchrun.sh) names itself in the messages through this variable.
PROG_VARIABLE = "SYNCNORM_RUN_PROG"
_NPROC_OPTIONS = ("--nproc", "--nproc-per-node", "--nproc_per_node")
_OWN_OPTIONS = ("--nproc N", "--cpu", "--dry-run", "--help")
# Options that say where the rendezvous is: with any of them, no --standalone.
_RENDEZVOUS = re.compile(r"^--(master|rdzv|node)[-_]")
_POSITIVE = re.compile(r"^[1-9][0-9]*$")
_NODES = re.compile(r"^[1-9][0-9]*(:[1-9][0-9]*)?$")


class _UsageError(Exception):
    """A command line this launcher refuses: one line, exit status 2."""


def _torchrun_parser(prog: str) -> ArgumentParser:
    """torchrun's own parser, its errors turned into one line."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = prog

    def error(message: str) -> NoReturn:
        raise _UsageError(f"torchrun options: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _torchrun_options(parser: ArgumentParser) -> dict[str, int]:
    """Every option string of torchrun, with how many values it takes (0 or 1)."""
    options = {}
    for action in parser._actions:  # argparse has no public list of its options
        for name in action.option_strings:
            options[name] = 0 if action.nargs == 0 else 1
    return options


def _unknown_option(option: str, torchrun: dict[str, int]) -> _UsageError:
    own = ["--nproc", "--cpu", "--dry-run", "--help"]
    listed = [o for o in torchrun if o.startswith("--") and "_" not in o and o not in ("--help", "--nproc-per-node")]
    close = difflib.get_close_matches(option.split("=")[0], own + listed, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    return _UsageError(f"unknown option {option} (before the script).{hint} Options: {', '.join(_OWN_OPTIONS)}, "
                       f"and torchrun's: {' '.join(listed)}")


def _build_command(argv: Sequence[str], prog: str) -> tuple[list[str], bool, list[str]]:
    """The torchrun arguments for ``argv``, whether it was a dry run, and the lines that say what it chose.

    Raises:
        _UsageError: a command line to refuse, before any process starts.
    """
    environ = os.environ
    nproc, nproc_from = environ.get("NPROC") or None, "NPROC"
    force_cpu = environ.get("SYNCNORM_CPU", "0") == "1"
    dry_run = False
    nnodes: Optional[str] = None
    rendezvous_given = False
    no_script_file = False  # -m module or --no-python command: the "script" is not a file here
    passthrough: list[str] = []
    torchrun: Optional[dict[str, int]] = None
    args = list(argv)
    while args and args[0].startswith("-"):
        arg = args.pop(0)
        option, has_value, value = arg.partition("=")
        if arg == "--":
            break
        if option in _NPROC_OPTIONS:
            if not has_value:
                if not args:
                    raise _UsageError(f"{arg} expects a positive integer")
                value = args.pop(0)
            nproc, nproc_from = value, "--nproc"
        elif arg == "--cpu":
            force_cpu = True
        elif arg == "--dry-run":
            dry_run = True
        elif arg in ("-h", "--help"):
            print(USAGE.format(prog=prog))
            raise SystemExit(0)
        elif option == "--nnodes":
            if not has_value:
                if not args:
                    raise _UsageError("--nnodes expects a positive integer")
                value = args.pop(0)
            nnodes = value
        else:
            if torchrun is None:
                torchrun = _torchrun_options(_torchrun_parser(prog))
            if option not in torchrun:
                raise _unknown_option(arg, torchrun)
            if option in ("-m", "--module", "--no-python", "--no_python"):
                no_script_file = True
            if torchrun[option] == 0:
                if has_value:
                    raise _UsageError(f"{option} takes no value (got {arg})")
                passthrough.append(arg)
            elif has_value:
                passthrough.append(arg)
            else:
                if not args:
                    raise _UsageError(f"{arg} expects a value")
                passthrough += [arg, args.pop(0)]
            rendezvous_given = rendezvous_given or bool(_RENDEZVOUS.match(option))

    if not args:
        raise _UsageError(f"expected a training script, e.g. {prog} examples/train_digits.py ({prog} --help)")
    if not no_script_file and not Path(args[0]).is_file():
        raise _UsageError(f"training script {args[0]} not found (from {os.getcwd()}); give the path of a .py file, "
                          "e.g. examples/train_digits.py")
    if nproc is not None and not _POSITIVE.match(nproc):
        raise _UsageError(f"{nproc_from} expects a positive integer (processes on this node), got '{nproc}'")
    if nnodes is None and environ.get("NNODES"):
        nnodes = environ["NNODES"]
    if nnodes is not None and not _NODES.match(nnodes):
        # torchrun also accepts an elastic range MIN:MAX of nodes.
        raise _UsageError(f"--nnodes (or NNODES) expects a positive integer or a range MIN:MAX, got '{nnodes}'")
    several_nodes = nnodes is not None and nnodes != "1"
    # The usual variables, as set by cluster schedulers, when the flags did not say otherwise.
    if several_nodes and not rendezvous_given:
        if not environ.get("MASTER_ADDR"):
            raise _UsageError(f"NNODES={nnodes} needs MASTER_ADDR (the first node) or --rdzv-endpoint HOST:PORT")
        passthrough += ["--node-rank", environ.get("NODE_RANK", "0"), "--master-addr", environ["MASTER_ADDR"],
                        "--master-port", environ.get("MASTER_PORT", "29500")]

    import torch

    gpus = 0 if force_cpu or not torch.cuda.is_available() else torch.cuda.device_count()
    if gpus > 0:
        nproc = nproc or str(gpus)
        if int(nproc) > gpus:
            raise _UsageError(f"--nproc {nproc} asks for more processes than the {gpus} GPU(s) here (NCCL needs one "
                              f"GPU a process); use --nproc {gpus} or less (NPROC={gpus} with make demo), or --cpu "
                              f"to run {nproc} CPU processes on Gloo")
        said = [f"{prog}: {gpus} GPU(s) found: {nproc} process(es) on this node, one GPU each, on NCCL"]
    else:
        nproc = nproc or "2"
        if force_cpu:
            environ["CUDA_VISIBLE_DEVICES"] = ""  # the scripts pick Gloo because they see no CUDA device
        threads = max(1, (os.cpu_count() or 1) // int(nproc))
        environ.setdefault("OMP_NUM_THREADS", str(threads))
        reason = "--cpu" if force_cpu else "no GPU found"
        said = [f"{prog}: {reason}: {nproc} CPU process(es) on this node on Gloo, {environ['OMP_NUM_THREADS']} "
                "thread(s) each (--nproc N or NPROC=N to change)"]

    if several_nodes:
        said.append(f"{prog}: node of {nnodes}, torchrun options: {' '.join(passthrough)}")
        passthrough = ["--nnodes", str(nnodes), *passthrough]
    elif not rendezvous_given:
        # One node: a free local port, so several jobs on one machine never collide.
        passthrough = ["--standalone", *passthrough]
    return ["--nproc-per-node", nproc, *passthrough, *args], dry_run, said


class _DropFailureLine(logging.Filter):
    """torchrun's agent logs each failed worker; the launcher's own line says it once, with the exit status."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def _recorded_error(message: object) -> str:
    """The first line of a worker's recorded error ("ValueError: ..."; ``@record`` writes it), or ""."""
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line for line in str(message).splitlines() if line.strip()]
    if not lines or lines[0].startswith("To enable traceback see"):  # torchrun's text when nothing was recorded
        return ""
    return lines[0]


def run(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Start the job that ``argv`` describes on this node; return the exit status.

    Args:
        argv: the command line after the program name (default ``sys.argv[1:]``): the launcher's options,
            torchrun's options, the script and its arguments.
        prog: the name in messages (default: the variable ``SYNCNORM_RUN_PROG``, else ``syncnorm-run``).

    Returns:
        0 when every process succeeded; 2 for a command line refused here; else the exit status of the
        first process that failed (128 + the signal's number for one ended by a signal).

    Example:
        >>> import syncnorm.launch
        >>> syncnorm.launch.run(["--nproc", "2", "train.py", "--epochs", "1"])
        0
    """
    prog = prog or os.environ.pop(PROG_VARIABLE, None) or "syncnorm-run"
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        command, dry_run, said = _build_command(argv, prog)
        # Parsed by torchrun's own parser: every option of the installed torch, checked as torchrun checks it.
        args = _torchrun_parser(prog).parse_args(command)
    except _UsageError as error:
        print(f"{prog}: {error}", file=sys.stderr, flush=True)
        return 2
    print("\n".join(said), flush=True)
    if dry_run:
        print(shlex.join([sys.executable, "-m", "torch.distributed.run", *command]))
        return 0

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run as torchrun

    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    if not any(isinstance(f, _DropFailureLine) for f in agent_log.filters):
        agent_log.addFilter(_DropFailureLine())
    try:
        torchrun(args)
    except ChildFailedError as error:
        # The failing process has printed its error above (its stderr is ours); torchrun's traceback of
        # its own agent would only bury it.
        rank, failure = error.get_first_failure()
        status = failure.exitcode
        how = f"status {status}"
        if status < 0:
            how = f"signal {signal.Signals(-status).name}" if -status in signal.valid_signals() else how
            status = 128 - status
        recorded = _recorded_error(failure.message)
        others = len(error.failures) - 1
        print(f"{prog}: {Path(error.name).name} exited with {how} on rank {rank}"
              + (f" and {others} other rank(s)" if others else "")
              + (f": {recorded}" if recorded else " (its error is above)"), file=sys.stderr, flush=True)
        return status or 1
    return 0


def console_main() -> None:
    """Entry point of the ``syncnorm-run`` console script: ``run()``, then exit with its status."""
    sys.exit(run())


if __name__ == "__main__":
    sys.exit(run(prog=os.environ.pop(PROG_VARIABLE, None) or "python -m syncnorm.launch"))
