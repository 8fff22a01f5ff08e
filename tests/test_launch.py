"""The launchers, end to end: each starts real processes that train the digits example for a few steps.

- launch/torchrun.sh without GPU falls back to N CPU processes on Gloo (default 2, and 4);
- two torchrun "nodes" on 127.0.0.1 (--nnodes 2) form one job and end with identical parameters;
- launch/mpirun.sh starts the same example on MPI ranks;
- `accelerate launch` with launch/accelerate_cpu.yaml trains examples/train_accelerate.py on 2 CPU processes.

The oracle is one process that trains on the whole global batch (train_digits' ``single`` run, float64, or
the plain-torch path of train_accelerate), checked against syncnorm's distributed run step by step; the
local-BatchNorm run shows the check can fail. Every subprocess has a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
STEPS = "4"
# float64 runs: syncnorm and the single process agree to rounding, far below local BatchNorm's difference.
EXACT = dict(rtol=1e-9, atol=1e-10)
BIN = Path(sys.executable).parent
# `make test` installs both (extras mpi and examples); elsewhere say what is missing instead of failing.
needs_mpirun = pytest.mark.skipif(not (BIN / "mpirun").exists() and shutil.which("mpirun") is None,
                                  reason="needs Open MPI's mpirun: pip install -e '.[mpi]'")
needs_accelerate = pytest.mark.skipif(not (BIN / "accelerate").exists(),
                                      reason="needs accelerate: pip install -e '.[examples]'")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHON"] = sys.executable
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # this venv's mpirun, accelerate
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a GPU machine: these tests are about the CPU fallback
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    # A session of its own, so a timeout can kill the launcher and every process it started.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"{' '.join(map(str, process.args))} did not finish within {TIMEOUT_S} s:\n{stdout}\n{stderr}")
    return stdout, stderr


def _run(cmd: list[str], env: dict[str, str]) -> str:
    process = _start(cmd, env)
    stdout, stderr = _finish(process)
    if process.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {process.returncode}:\n{stdout[-4000:]}\n{stderr[-6000:]}")
    return stdout


def _launch_here(args: list[str], monkeypatch: pytest.MonkeyPatch, **variables: str) -> int:
    """The launcher's run() in this process (no torch import to wait for), as launch/torchrun.sh calls it."""
    from syncnorm import launch

    monkeypatch.chdir(REPO)
    for name, value in _env(SYNCNORM_CPU="1", **variables).items():
        monkeypatch.setenv(name, value)
    for name in {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC"} - variables.keys():
        monkeypatch.delenv(name, raising=False)
    return launch.run(args, prog="launch/torchrun.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _results(out: Path, prefix: str, world: int) -> list[dict[str, Any]]:
    files = sorted(out.glob(f"{prefix}_rank*.pt"))
    assert [f.name for f in files] == [f"{prefix}_rank{r}.pt" for r in range(world)], files
    return [torch.load(f, weights_only=False) for f in files]


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance: Any) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if tolerance:
            torch.testing.assert_close(a[key], b[key], **tolerance, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(a[key], b[key]), f"{key} differs between ranks"


def _check_digits_run(out: Path, world: int, with_local: bool) -> None:
    """Every rank reports; syncnorm is identical on all ranks and equals the single process on the whole batch."""
    results = _results(out, "train_digits", world)
    assert [(r["rank"], r["world_size"], r["backend"]) for r in results] == [(i, world, "gloo") for i in range(world)]
    for r in results[1:]:
        _assert_same_state(r["runs"]["syncnorm"]["state_dict"], results[0]["runs"]["syncnorm"]["state_dict"])
    single, synced = results[0]["runs"]["single"], results[0]["runs"]["syncnorm"]
    assert len(synced["losses"]) == int(STEPS)
    torch.testing.assert_close(torch.tensor(synced["losses"]), torch.tensor(single["losses"]), **EXACT)
    _assert_same_state(synced["state_dict"], single["state_dict"], **EXACT)
    if with_local:
        # Local BatchNorm on 4 images a rank trains another model: the comparison above can fail.
        local = torch.tensor(results[0]["runs"]["local"]["losses"])
        assert (local - torch.tensor(single["losses"])).abs().max() > 1e-3


@pytest.mark.parametrize("nproc", [None, 4], ids=["default_2", "4"])
def test_torchrun_without_gpu_falls_back_to_gloo_cpu_processes(tmp_path: Path, nproc: int | None) -> None:
    world = nproc or 2
    with_local = nproc is None  # the full three-way demo (and its plot) once; the 4-rank run keeps to two runs
    runs = [] if with_local else ["--runs", "syncnorm,single", "--no-plot"]
    cmd = ["launch/torchrun.sh", *([] if nproc is None else ["--nproc", str(nproc)]),
           "examples/train_digits.py", "--steps", STEPS, "--out", str(tmp_path), *runs]
    stdout = _run(cmd, _env())
    assert f"no GPU found: {world} CPU process(es) on this node on Gloo" in stdout
    assert f"train_digits: {world} rank(s) on cpu with gloo" in stdout
    _check_digits_run(tmp_path, world, with_local)
    if with_local:
        assert "| syncnorm, 2 ranks |" in stdout and (tmp_path / "train_digits.png").stat().st_size > 10_000


def test_two_torchrun_nodes_on_loopback_end_with_identical_parameters(tmp_path: Path) -> None:
    port = str(_free_port())
    env = _env()
    nodes = [
        _start(["launch/torchrun.sh", "--nproc", "1", "--nnodes", "2", "--node-rank", str(node),
                "--master-addr", "127.0.0.1", "--master-port", port,
                "examples/train_digits.py", "--steps", STEPS, "--out", str(tmp_path), "--runs", "syncnorm,single",
                "--no-plot"], env)
        for node in (0, 1)
    ]
    try:
        outputs = [_finish(node) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:  # the other node failed: do not leave this one waiting at the rendezvous
                os.killpg(node.pid, signal.SIGKILL)
                node.communicate(timeout=30)
    for i, (node, (stdout, stderr)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {i} exited with {node.returncode}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        assert "node of 2" in stdout
    _check_digits_run(tmp_path, 2, with_local=False)


@needs_mpirun
def test_mpirun_launcher_runs_the_example_on_mpi_ranks(tmp_path: Path) -> None:
    cmd = ["launch/mpirun.sh", "-n", "2", "examples/train_digits.py", "--steps", STEPS, "--out", str(tmp_path),
           "--runs", "syncnorm,single", "--no-plot"]
    stdout = _run(cmd, _env())
    assert "no GPU found: 2 MPI rank(s) on CPU, on Gloo" in stdout
    _check_digits_run(tmp_path, 2, with_local=False)


@needs_mpirun
@needs_accelerate
def test_accelerate_launch_trains_on_two_cpu_processes(tmp_path: Path) -> None:
    # Accelerate starts multi-CPU jobs with mpirun, which refuses root (CI containers) unless told.
    env = _env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate_cpu.yaml",
           "--main_process_port", str(_free_port()), "examples/train_accelerate.py", "--steps", STEPS,
           "--out", str(tmp_path)]
    stdout = _run(cmd, env)
    assert "train_accelerate: 2 process(es), DistributedType.MULTI_CPU, device cpu" in stdout
    results = _results(tmp_path, "train_accelerate", 2)
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    _assert_same_state(results[1]["state_dict"], results[0]["state_dict"])

    # The oracle: the same model in this process on the whole batch of each step (plain torch, no Accelerate).
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import train_accelerate
    finally:
        sys.path.remove(str(REPO / "examples"))
    losses, model = train_accelerate.train(None, batch_per_process=4, world=2, steps=int(STEPS), lr=0.02, seed=0)
    torch.testing.assert_close(torch.tensor(results[0]["losses"]), torch.tensor(losses), **EXACT)
    _assert_same_state(results[0]["state_dict"], model.state_dict(), **EXACT)


@pytest.mark.parametrize(
    ("args", "variables", "expected"),
    [
        ([], {}, "--nproc-per-node 2 --standalone"),
        (["--nproc", "3"], {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"},
         "--nproc-per-node 3 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 1234"),
        (["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "7"], {},
         "--nproc-per-node 2 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id 7"),
    ],
    ids=["one_node", "node_variables", "c10d_flags"],
)
def test_torchrun_launcher_passes_nodes_and_rendezvous_to_torchrun(
    args: list[str], variables: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = "examples/train_digits.py"  # it must exist, even for a dry run
    status = _launch_here(["--dry-run", *args, script, "--steps", "3"], monkeypatch, **variables)
    out, err = capsys.readouterr()
    assert status == 0, err
    command = out.strip().splitlines()[-1]
    assert command == f"{sys.executable} -m torch.distributed.run {expected} {script} --steps 3"


def test_launcher_scripts_parse_and_explain_a_missing_script() -> None:
    scripts = [*REPO.glob("launch/*.sh"), *REPO.glob("launch/*.sbatch")]
    assert len(scripts) >= 3
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    done = subprocess.run(["launch/torchrun.sh", "--nproc", "2"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "expected a training script" in done.stderr


# Argument errors: each is reported in one line with exit status 2 before any process starts (launchers) or any
# process-group work (examples), so none of these tests trains anything.
NPROC_EXPECTED = "--nproc expects a positive integer (processes on this node)"
RANKS_EXPECTED = "expects a positive integer (the number of MPI ranks)"
TORCHRUN_OPTIONS = "Options: --nproc N, --cpu, --dry-run, --help, and torchrun's: --nnodes --rdzv-backend"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "0", "examples/train_digits.py"], f"{NPROC_EXPECTED}, got '0'"),
        (["--nproc", "abc", "examples/train_digits.py"], f"{NPROC_EXPECTED}, got 'abc'"),
        (["--nproc", "-2", "examples/train_digits.py"], f"{NPROC_EXPECTED}, got '-2'"),
        (["--dry-run", "--nproc=0", "examples/train_digits.py"], "--nproc expects a positive integer"),
        (["--nnodes", "x", "examples/train_digits.py"], "--nnodes (or NNODES) expects a positive integer"),
        (["--cpus", "examples/train_digits.py"],
         f"unknown option --cpus (before the script). Did you mean --cpu? {TORCHRUN_OPTIONS}"),
        (["--dryrun", "examples/train_digits.py"],
         f"unknown option --dryrun (before the script). Did you mean --dry-run? {TORCHRUN_OPTIONS}"),
        (["--max-restarts", "x", "examples/train_digits.py"],
         "torchrun options: argument --max-restarts/--max_restarts: invalid int value: 'x'"),
        (["--standalone=1", "examples/train_digits.py"], "--standalone takes no value (got --standalone=1)"),
        (["examples/nope.py"], "training script examples/nope.py not found"),
        (["--nproc", "2"], "expected a training script"),
    ],
    ids=["nproc_0", "nproc_abc", "nproc_negative", "nproc_equals_0_dry_run", "nnodes_abc", "unknown_cpus",
         "unknown_dryrun", "torchrun_value", "torchrun_flag_with_value", "missing_script", "no_script"],
)
def test_torchrun_launcher_rejects_bad_arguments_in_one_line(args: list[str], message: str,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    status = _launch_here(args, monkeypatch)
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"launch/torchrun.sh: {message}"), err
    assert "process(es)" not in out  # stopped before choosing, let alone starting, any process


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "0", "examples/train_digits.py"], f"-n {RANKS_EXPECTED}, got '0'"),
        (["-np", "two", "examples/train_digits.py"], f"-np {RANKS_EXPECTED}, got 'two'"),
        (["-n", "2", "examples/nope.py"], "training script examples/nope.py not found"),
        (["-n", "2"], "expected a training script (a .py file)"),
    ],
    ids=["n_0", "np_two", "missing_script", "no_script"],
)
def test_mpirun_launcher_rejects_bad_arguments_in_one_line(args: list[str], message: str) -> None:
    done = subprocess.run(["launch/mpirun.sh", *args], cwd=REPO, env=_env(MPIRUN="/bin/false"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.splitlines()[-1].startswith(f"launch/mpirun.sh: {message}")
    assert "MPI rank(s)" not in done.stdout  # nothing was started


@pytest.mark.parametrize("launcher", ["launch/torchrun.sh", "launch/mpirun.sh", "python -m syncnorm.launch"])
def test_launchers_answer_help(launcher: str) -> None:
    command = [sys.executable, "-m", "syncnorm.launch"] if launcher.startswith("python") else [launcher]
    done = subprocess.run([*command, "--help"], cwd=REPO, env=_env(MPIRUN="/bin/false"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("Run a training script")
    assert f"Usage: {launcher}" in done.stdout and "--help" in done.stdout and "positive integer" in done.stdout


# What a failing script leaves of the launcher's output: the script's own error (its stderr is the launcher's),
# one line naming the first failing rank and its status, and that status as the launcher's; never torchrun's
# traceback of its agent (ChildFailedError) nor its per-worker "failed (exitcode: ...)" log line.
USAGE_ERROR = """\
import argparse
parser = argparse.ArgumentParser(prog="tiny.py")
parser.add_argument("--steps", type=int)
parser.parse_args()
"""
FAILURES = {
    "exit_3": ("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n", 3,
               "tiny.py exited with status 3 on rank 1 (its error is above)"),
    "recorded_error": ("import os\nfrom torch.distributed.elastic.multiprocessing.errors import record\n\n"
                       "@record\ndef main():\n    if os.environ['RANK'] == '1':\n"
                       "        raise ValueError('bad value on rank 1\\nsecond line')\n\nmain()\n", 1,
                       "tiny.py exited with status 1 on rank 1: ValueError: bad value on rank 1"),
    "killed": ("import os, signal\nif os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n", 137,
               "tiny.py exited with signal SIGKILL on rank 1"),
}
LAUNCHERS = {"torchrun_sh": ["launch/torchrun.sh"], "python_m": [sys.executable, "-m", "syncnorm.launch"]}


def _launch(launcher: list[str], script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    process = _start([*launcher, "--nproc", "2", str(script), *args], _env())
    stdout, stderr = _finish(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _assert_no_torchrun_traceback(stderr: str) -> None:
    for noise in ("Traceback", "ChildFailedError", "failed (exitcode", "Root Cause"):
        assert noise not in stderr, stderr


@pytest.mark.parametrize("launcher", list(LAUNCHERS), ids=list(LAUNCHERS))
def test_a_mistyped_script_option_ends_in_its_usage_line_and_status_2(tmp_path: Path, launcher: str) -> None:
    script = tmp_path / "tiny.py"
    script.write_text(USAGE_ERROR)
    done = _launch(LAUNCHERS[launcher], script, "--stpes", "3")
    assert done.returncode == 2, (done.stdout, done.stderr)
    _assert_no_torchrun_traceback(done.stderr)
    lines = done.stderr.splitlines()
    # Both ranks print it, unless torchrun stopped one first.
    assert 1 <= lines.count("tiny.py: error: unrecognized arguments: --stpes 3") <= 2, done.stderr
    prog = "launch/torchrun.sh" if launcher == "torchrun_sh" else "python -m syncnorm.launch"
    assert lines[-1].startswith(f"{prog}: tiny.py exited with status 2 on rank "), done.stderr
    assert lines[-1].endswith("(its error is above)")


@pytest.mark.parametrize("failure", list(FAILURES), ids=list(FAILURES))
def test_the_first_failing_rank_gives_the_exit_status_and_one_line(tmp_path: Path, failure: str) -> None:
    code, status, line = FAILURES[failure]
    script = tmp_path / "tiny.py"
    script.write_text(code)
    done = _launch(LAUNCHERS["python_m"], script)
    assert done.returncode == status, (done.stdout, done.stderr)
    # torchrun stops the other rank when rank 1 fails; if rank 0 had not finished yet, it counts as failed too
    # ("and 1 other rank(s)"): the first failure, the one named, is rank 1's either way.
    last = re.sub(r" and 1 other rank\(s\)", "", done.stderr.splitlines()[-1])
    assert last.startswith(f"python -m syncnorm.launch: {line}"), done.stderr
    if failure != "recorded_error":  # there the script's own traceback is the one printed
        _assert_no_torchrun_traceback(done.stderr)
    else:
        assert "ChildFailedError" not in done.stderr and "failed (exitcode" not in done.stderr


def test_a_script_that_succeeds_on_every_rank_exits_0(tmp_path: Path) -> None:
    script = tmp_path / "tiny.py"
    script.write_text("import os\nprint('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\n")
    done = _launch(LAUNCHERS["python_m"], script)
    assert done.returncode == 0, done.stderr
    ranks = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert ranks == ["rank 0 of 2", "rank 1 of 2"], (done.stdout, done.stderr)
    assert done.stdout.splitlines()[0] == ("python -m syncnorm.launch: no GPU found: 2 CPU process(es) on this node "
                                           "on Gloo, 1 thread(s) each (--nproc N or NPROC=N to change)")


def _example(name: str) -> Any:
    sys.path.insert(0, str(REPO / "examples"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "examples"))


@pytest.mark.parametrize(
    ("script", "args", "world", "message"),
    [
        ("train_digits", ["--steps", "0"], 1, "argument --steps: invalid positive integer value: '0'"),
        ("train_digits", ["--steps", "-5"], 1, "argument --steps: invalid positive integer value: '-5'"),
        ("train_digits", ["--batch-per-rank", "0"], 1, "argument --batch-per-rank: invalid positive integer value"),
        ("train_digits", ["--batch-per-rank", "-1"], 1, "argument --batch-per-rank: invalid positive integer value"),
        ("train_digits", ["--batch-per-rank", "2000"], 1, "a global batch of 2000 images, but the digits have 1437"),
        ("train_digits", ["--batch-per-rank", "360"], 4, "--batch-per-rank 360 on 4 rank(s) asks for a global batch"
         " of 1440 images, but the digits have 1437 to train on; use --batch-per-rank 359 or less"),
        ("train_digits", ["--runs", ","], 1, "--runs expected a comma-separated subset of local,syncnorm,single"),
        ("train_digits", ["--runs", "local,sync"], 1, "got 'sync'"),
        ("train_digits", ["--lr", "0"], 1, "argument --lr: invalid positive number value: '0'"),
        ("train_accelerate", ["--steps", "0"], 2, "argument --steps: invalid positive integer value: '0'"),
        ("train_accelerate", ["--batch-per-process", "2000"], 1, "a global batch of 2000 images"),
        ("train_accelerate", ["--batch-per-process", "719"], 2, "use --batch-per-process 718 or less"),
        ("train_accelerate", ["--check"], 1, "this is one process: nothing to compare"),
    ],
    ids=["steps_0", "steps_negative", "batch_0", "batch_negative", "batch_2000", "batch_360_on_4", "runs_empty",
         "runs_unknown", "lr_0", "accelerate_steps_0", "accelerate_batch_2000", "accelerate_batch_719_on_2",
         "accelerate_check_on_one_process"],
)
def test_examples_reject_bad_arguments_with_a_usage_error(script: str, args: list[str], world: int, message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    module = _example(script)
    with pytest.raises(SystemExit) as stopped:
        module.parse_args(args, world_size=world)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: "), lines
    assert message in lines[0] and lines[0].endswith("(--help lists the options)")


def test_examples_accept_their_defaults_and_the_largest_batch() -> None:
    assert _example("train_digits").parse_args([], world_size=4).runs == ["local", "syncnorm", "single"]
    assert _example("train_digits").parse_args(["--batch-per-rank", "359"], world_size=4).batch_per_rank == 359
    assert _example("train_accelerate").parse_args(["--check"], world_size=2).check


def test_a_batch_the_data_cannot_fill_stops_every_rank_at_once_instead_of_hanging(tmp_path: Path) -> None:
    # Before the check, this global batch of 2 x 1000 images looped forever building its first batch.
    cmd = ["launch/torchrun.sh", "--nproc", "2", "examples/train_digits.py", "--batch-per-rank", "1000",
           "--out", str(tmp_path)]
    process = _start(cmd, _env())
    stdout, stderr = _finish(process)
    assert process.returncode != 0
    # Both ranks exit with status 2 before init_process_group, each printing the one line (torchrun may stop a
    # rank before it prints, once the other has exited: at least one copy, and only this line).
    errors = [line for line in stderr.splitlines() if line.startswith("train_digits.py: error:")]
    assert 1 <= len(errors) <= 2 and set(errors) == {
        "train_digits.py: error: --batch-per-rank 1000 on 2 rank(s) asks for a global batch of 2000 "
        "images, but the digits have 1437 to train on; use --batch-per-rank 718 or less "
        "(--help lists the options)"}, stderr
    assert process.returncode == 2 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1].startswith("launch/torchrun.sh: train_digits.py exited with status 2 on rank ")
    assert "train_digits:" not in stdout and not list(tmp_path.iterdir())


def _fake_gpu_env(tmp_path: Path, gpus: int) -> dict[str, str]:
    """A machine with ``gpus`` GPUs, as the launchers see one: ``nvidia-smi -L`` lists them, torch counts them.

    A fake ``nvidia-smi`` first on PATH (the Makefile asks it), and a ``sitecustomize`` first on PYTHONPATH that
    makes torch answer ``torch.cuda.is_available()`` and ``device_count()`` so (the launcher asks torch); nothing
    touches a GPU: the demo's dry run prints its command only.
    """
    bin_dir, fake_torch = tmp_path / "bin", tmp_path / "fake_gpus"
    bin_dir.mkdir()
    fake_torch.mkdir(parents=True)
    listing = "".join(f'echo "GPU {i}: NVIDIA Fake (UUID: GPU-fake-{i})"\n' for i in range(gpus))
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + (listing if gpus else 'echo "No devices were found"; exit 6\n'))
    smi.chmod(0o755)
    (fake_torch / "sitecustomize.py").write_text(
        f"import torch\ntorch.cuda.is_available = lambda: {gpus} > 0\ntorch.cuda.device_count = lambda: {gpus}\n")
    env = _env()
    # A `make test` around this test passes its command-line variables down through MAKEFLAGS: drop them.
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "NPROC", "CPU", "DRY_RUN", "VIRTUAL_ENV", "VENV", "LAUNCHER",
                 "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"):
        env.pop(name, None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = f"{fake_torch}{os.pathsep}{env['PYTHONPATH']}"
    return env


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make (the README's make demo)")
@pytest.mark.parametrize(
    ("gpus", "variables", "ranks", "line"),
    [
        (0, [], 4, "no GPU found: 4 CPU process(es) on this node on Gloo"),
        (1, [], 1, "1 GPU(s) found: 1 process(es) on this node, one GPU each, on NCCL"),
        (2, [], 2, "2 GPU(s) found: 2 process(es)"),
        (3, [], 3, "3 GPU(s) found: 3 process(es)"),
        (4, [], 4, "4 GPU(s) found: 4 process(es)"),
        (8, [], 8, "8 GPU(s) found: 8 process(es)"),
        (0, ["NPROC=2"], 2, "no GPU found: 2 CPU process(es)"),
        (4, ["NPROC=2"], 2, "4 GPU(s) found: 2 process(es)"),
        (2, ["CPU=1"], 4, "--cpu: 4 CPU process(es) on this node on Gloo"),
        (8, ["CPU=1", "NPROC=2"], 2, "--cpu: 2 CPU process(es)"),
    ],
    ids=["no_gpu", "1_gpu", "2_gpus", "3_gpus", "4_gpus", "8_gpus", "no_gpu_nproc_2", "4_gpus_nproc_2", "cpu",
         "cpu_nproc_2"],
)
def test_make_demo_takes_one_rank_a_gpu_or_4_cpu_processes(tmp_path: Path, gpus: int, variables: list[str],
                                                           ranks: int, line: str) -> None:
    done = subprocess.run(["make", "--no-print-directory", "demo", "DRY_RUN=1", *variables], cwd=REPO,
                          env=_fake_gpu_env(tmp_path, gpus), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    # The make line, the launcher's one line on what it chose, and the torchrun command it would run.
    assert len(lines) == 3 and lines[0].startswith("PYTHON="), lines
    assert lines[1].startswith(f"launch/torchrun.sh: {line}"), lines
    assert lines[2] == f"{sys.executable} -m torch.distributed.run --nproc-per-node {ranks} --standalone " \
                       "examples/train_digits.py", lines


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make (the README's make demo)")
def test_make_demo_with_more_ranks_than_gpus_says_how_to_run(tmp_path: Path) -> None:
    done = subprocess.run(["make", "--no-print-directory", "demo", "DRY_RUN=1", "NPROC=3"], cwd=REPO,
                          env=_fake_gpu_env(tmp_path, 2), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--nproc 3 asks for more processes than the 2 GPU(s) here" in done.stderr
    assert "use --nproc 2 or less (NPROC=2 with make demo), or --cpu to run 3 CPU processes on Gloo" in done.stderr
    assert "--nproc-per-node" not in done.stdout  # nothing launched, not even as a dry run
