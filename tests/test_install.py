"""What a user installs: the sdist and the wheel built from it, then the wheel alone in a fresh virtual environment.

- The sdist holds the package, its licence, readme and changelog, and no tests (they need the repository's
  examples/, launch/ and docs/; a test module without its helpers would fail to import).
- In a new virtual environment with only torch and the wheel (no checkout on the path), the console
  scripts are complete: ``syncnorm-selftest`` starts 2 CPU ranks on Gloo and passes, and ``syncnorm-run
  --nproc 2`` runs a script whose SyncBatchNorm pools both ranks' batches (checked against
  ``torch.nn.BatchNorm1d`` on the concatenated batch, in this process).

The torch of the new environment is ``SYNCNORM_TEST_TORCH`` (default ``torch==2.13.0``, the oldest torch
syncnorm supports), installed with pip from its configured index or wheel directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TORCH = os.environ.get("SYNCNORM_TEST_TORCH", "torch==2.13.0")
TIMEOUT_S = 600
# Not copied into the build: caches, environments, outputs.
IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "out", "site", "build", "dist", "*.egg-info", "__pycache__",
                                 ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"{' '.join(cmd)} did not finish within {TIMEOUT_S} s:\n{stdout}\n{stderr}")
    done = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    assert done.returncode == 0, f"{' '.join(cmd)} exited with {done.returncode}:\n{stdout[-4000:]}\n{stderr[-6000:]}"
    return done


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel that ``python -m build`` builds from it, of a copy of the checkout."""
    source = tmp_path_factory.mktemp("checkout") / "syncnorm"
    shutil.copytree(REPO, source, ignore=IGNORED)
    out = tmp_path_factory.mktemp("dist")
    # No build isolation: the installed setuptools, nothing downloaded.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)], cwd=source)
    return out


def _only(directory: Path, pattern: str) -> Path:
    found = list(directory.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_sdist_holds_the_package_and_no_tests(dist_dir: Path) -> None:
    import syncnorm

    sdist = _only(dist_dir, f"syncnorm-{syncnorm.__version__}.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert not [name for name in names if name.startswith("tests")], sorted(names)
    package = {f"syncnorm/{path.name}" for path in (REPO / "syncnorm").iterdir() if path.suffix in (".py", ".typed")}
    assert package <= names, sorted(package - names)
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml"} <= names


def test_wheel_built_from_the_sdist_has_both_console_scripts(dist_dir: Path) -> None:
    wheel = _only(dist_dir, "syncnorm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "syncnorm/launch.py" in names and "syncnorm/selftest.py" in names
    assert "syncnorm-run = syncnorm.launch:console_main" in entry_points
    assert "syncnorm-selftest = syncnorm.selftest:console_main" in entry_points


@pytest.fixture(scope="module")
def venv(dist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with torch and the wheel: its bin/ directory."""
    root = tmp_path_factory.mktemp("venv")
    # No pip inside it: this interpreter's pip installs into it (--python), which saves the seconds of ensurepip.
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root)
    bin_dir = root / ("Scripts" if os.name == "nt" else "bin")
    # --no-compile: byte-compiling torch's thousands of files would be most of the time.
    _run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q", "--no-compile", TORCH,
          str(_only(dist_dir, "syncnorm-*.whl"))], cwd=root)
    return bin_dir


def _venv_env(bin_dir: Path) -> dict[str, str]:
    """The environment of a user of that venv: none of this checkout on the path, no GPU, one thread a rank."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                        "NPROC", "NNODES", "SYNCNORM_RUN_PROG")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_selftest_entry_point_passes_on_2_cpu_ranks_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    report = tmp_path / "selftest.json"
    done = _run([str(venv / "syncnorm-selftest"), "--quick", "--no-speed", "--json", str(report)], cwd=tmp_path,
                env=_venv_env(venv))
    assert "syncnorm.selftest: no GPU found: 2 CPU process(es) on this node on Gloo" in done.stdout
    assert "**PASSED**" in done.stdout
    result = json.loads(report.read_text())
    assert result["passed"] and result["environment"]["world_size"] == 2
    assert result["environment"]["backend"] == "gloo"
    if "==" in TORCH:
        assert result["environment"]["torch"].split("+")[0] == TORCH.split("==")[1]
    assert {r["verdict"] for r in result["exactness"]} == {"PASS"}


SCRIPT = """\
import torch
import torch.distributed as dist

import syncnorm

dist.init_process_group("gloo")
rank = dist.get_rank()
layer = syncnorm.SyncBatchNorm(2)
layer(torch.arange(6.0).reshape(3, 2) + 10 * rank)
print(f"rank {rank} of {dist.get_world_size()}: running_mean {layer.running_mean.tolist()} {syncnorm.__file__}")
dist.destroy_process_group()
"""


def test_syncnorm_run_entry_point_runs_a_script_on_2_cpu_ranks(venv: Path, tmp_path: Path) -> None:
    script = tmp_path / "tiny.py"
    script.write_text(SCRIPT)
    done = _run([str(venv / "syncnorm-run"), "--nproc", "2", str(script)], cwd=tmp_path, env=_venv_env(venv))
    assert done.stdout.startswith("syncnorm-run: no GPU found: 2 CPU process(es) on this node on Gloo"), done.stdout
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, done.stdout
    # The oracle: torch's BatchNorm on both ranks' batches at once.
    reference = torch.nn.BatchNorm1d(2)
    reference(torch.cat([torch.arange(6.0).reshape(3, 2) + 10 * rank for rank in range(2)]))
    for rank, line in enumerate(lines):
        head, _, rest = line.partition(": running_mean ")
        assert head == f"rank {rank} of 2"
        values, _, path = rest.partition("] ")
        torch.testing.assert_close(torch.tensor(json.loads(values + "]")), reference.running_mean)
        assert Path(path).is_relative_to(venv.parent), f"syncnorm imported from {path}, not from the new venv"
