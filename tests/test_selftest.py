"""``python -m syncnorm.selftest`` end to end, under torchrun on CPU Gloo ranks.

It passes on 2 ranks that it starts itself when run alone, and on 3 ranks under torchrun (one rank, under
torchrun, is run by benchmarks/gpu.sh); run alone it refuses fewer than 2 ranks; it FAILS (non-zero exit on
every rank, FAILED in its table) when every
all-reduce is corrupted by 0.1 % (tests/selftest_hook/sitecustomize.py, activated by an environment
variable): a self-check that cannot fail is not a check; and a group that cannot form (a rank that was
never started) ends with a clear message and a non-zero exit within its --timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOOK = Path(__file__).resolve().parent / "selftest_hook"
TIMEOUT_S = 300


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU Gloo path, even on a GPU machine (gpu.sh runs the CUDA one)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"{args} did not finish within {TIMEOUT_S} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def _torchrun(nproc: int, *selftest_args: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "syncnorm.selftest", "--quick", *selftest_args]


@pytest.mark.parametrize("nproc", [2, 3], ids=["2_ranks_started_alone", "3_ranks_under_torchrun"])
def test_selftest_passes_on_gloo_cpu_ranks(tmp_path: Path, nproc: int) -> None:
    report = tmp_path / "selftest.json"
    if nproc == 2:  # alone: it starts its ranks itself, 2 CPU processes without GPU
        done = _run(["-m", "syncnorm.selftest", "--quick", "--json", str(report)], _env())
        assert done.stdout.startswith("syncnorm.selftest: not started by a launcher: starting 2 rank(s) "
                                      "(syncnorm-run --nproc 2 -m syncnorm.selftest)\n"), done.stdout
    else:  # the speed part once (2 ranks): it only times, and 3 ranks on 2 busy cores would take long
        done = _run(_torchrun(nproc, "--json", str(report), "--no-speed"), _env())
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr[-6000:]}"
    assert "### Exactness" in done.stdout and "**PASSED**" in done.stdout
    assert done.stdout.count("## syncnorm self-test") == 1, "only rank 0 prints the tables"
    result = json.loads(report.read_text())
    assert result["passed"] and result["environment"]["world_size"] == nproc
    assert result["environment"]["backend"] == "gloo"
    verdicts = {r["name"]: r["verdict"] for r in result["exactness"]}
    assert set(verdicts.values()) == {"PASS"}, verdicts  # the empty-rank case runs too (W >= 2)
    assert len(verdicts) == 8
    assert all(0 <= r["ratio"] <= 1 for r in result["exactness"])
    if nproc == 2:
        assert "### Speed" in done.stdout and result["speed"]
        assert all(float(row["ms"]["syncnorm"]) > 0 and float(row["ms"]["local BatchNorm"]) > 0
                   for row in result["speed"])
        assert all(row["notes"].get("torch.nn.SyncBatchNorm") == "refused" for row in result["speed"])
        assert "torch.nn.SyncBatchNorm refuses cpu tensors" in done.stdout
        # What the ratio measures on CPU: the same layer without communication is timed beside it, and the
        # line under the table states the share of communication that the JSON holds.
        assert all(float(row["ms"]["syncnorm without communication"]) > 0 for row in result["speed"])
        assert "| syncnorm ms | syncnorm without communication ms | local BatchNorm ms |" in done.stdout
        for row in result["speed"]:  # the share is what the two columns say (to their rounding)
            alone, synced = float(row["ms"]["syncnorm without communication"]), float(row["ms"]["syncnorm"])
            assert row["communication_share"] == pytest.approx(max(0.0, 1 - alone / synced), abs=5e-3), row
        shares = sorted(f"{row['communication_share']:.0%}" for row in result["speed"])
        span = shares[0] if shares[0] == shares[-1] else f"{shares[0]} to {shares[-1]}"
        line = next(line for line in done.stdout.splitlines() if line.startswith("- On CPU ranks "))
        assert f"communication over Gloo (loopback TCP between processes that share this machine's cores) is {span} " \
               "of syncnorm's time" in line, line


@pytest.mark.parametrize(
    ("argv", "gpus", "message"),
    [
        (["--nproc", "1"], 0, "--nproc 1: a self-check of communication needs 2 ranks or more. One process alone: "
         "syncnorm-run --nproc 1 -m syncnorm.selftest"),
        ([], 1, "1 GPU here, and NCCL needs one GPU a rank: a self-check of communication needs 2. Run it on 2 CPU "
         "ranks (syncnorm-selftest --device cpu)"),
        (["--backend", "gloo", "--nproc", "3"], 2, "--nproc 3 with CUDA tensors over Gloo on 2 GPU(s): start the ranks "
         "with python -m torch.distributed.run --standalone --nproc-per-node 3 -m syncnorm.selftest --backend gloo"),
    ],
    ids=["nproc_1", "one_gpu", "gloo_more_ranks_than_gpus"],
)
def test_selftest_alone_refuses_fewer_than_2_ranks_with_how_to_run_it(
    argv: list[str], gpus: int, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    import syncnorm.selftest

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    # The GPUs torch would see (none is used: it refuses before starting anything).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert syncnorm.selftest.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"syncnorm.selftest: {message}"), err


def test_selftest_fails_on_every_rank_when_an_all_reduce_is_corrupted_by_0_1_percent(tmp_path: Path) -> None:
    env = _env(SYNCNORM_TEST_PERTURB_ALL_REDUCE="0.001",
               PYTHONPATH=os.pathsep.join((str(HOOK), str(REPO))),
               TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"))
    done = _run([*_torchrun(2, "--no-speed"), "--json", str(tmp_path / "r.json")], env)
    assert done.returncode != 0, f"a corrupted all-reduce passed:\n{done.stdout}"
    assert "**FAILED: " in done.stdout, done.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    failed = {r["name"] for r in result["exactness"] if r["verdict"] == "FAIL"}
    # Every case whose statistics cross ranks; the DDP step also through the gradient all-reduce.
    assert {"2-D (N, C)", "uneven batches", "one rank empty", "DDP step, converted conv net"} <= failed, failed
    # Both ranks exited non-zero (torchrun reports each failed local rank).
    assert "local_rank: 0" in done.stderr and "local_rank: 1" in done.stderr, done.stderr[-4000:]


def test_selftest_ends_with_a_message_when_the_group_cannot_form() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Rank 0 of 2, and rank 1 never starts.
    env = _env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start = time.monotonic()
    done = _run(["-m", "syncnorm.selftest", "--quick", "--timeout", "5"], env)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "could not form the gloo process group" in done.stderr or "did not finish within" in done.stderr, \
        done.stderr[-4000:]
    assert elapsed < 60, f"took {elapsed:.0f} s with --timeout 5"


@pytest.mark.parametrize("script", ["benchmarks/check_cuda.py", "benchmarks/bench_gpu.py", "syncnorm/selftest.py"])
def test_gpu_sh_scripts_import_and_answer_help_on_cpu(script: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/gpu.sh needs a GPU: without one, at least every Python file it calls imports and parses --help."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO))
    spec = importlib.util.spec_from_file_location(f"gpu_sh_{Path(script).stem}", REPO / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_gpu_sh_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(REPO / "benchmarks/gpu.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
