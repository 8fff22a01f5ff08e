"""The package looks after itself: a wheel with py.typed and LICENSE, one version, help, `python -m syncnorm`."""

from __future__ import annotations

import pydoc
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import syncnorm

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (so no build/ or egg-info lands in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "syncnorm", source / "syncnorm", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the installed setuptools, nothing downloaded.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(out.glob("syncnorm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode()


def test_wheel_ships_py_typed_and_the_license(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "syncnorm/py.typed" in names  # PEP 561: users' mypy reads syncnorm's annotations
    licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert licenses, names
    text = zipfile.ZipFile(wheel).read(licenses[0]).decode()
    assert "BSD 3-Clause License" in text and "the syncnorm authors" in text
    assert "License-Expression: BSD-3-Clause" in _metadata(wheel).splitlines()


def test_wheel_version_is_the_package_version(wheel: Path) -> None:
    assert f"Version: {syncnorm.__version__}" in _metadata(wheel).splitlines()
    assert wheel.name.startswith(f"syncnorm-{syncnorm.__version__}-")
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {syncnorm.__version__}" in changelog, "CHANGELOG.md has no section for the current version"


def test_help_of_forward_documents_syncnorm_not_torch() -> None:
    text = pydoc.render_doc(syncnorm.SyncBatchNorm.forward, renderer=pydoc.plaintext)
    assert "Should be overridden by all subclasses" not in text
    assert "global batch" in text and "Returns:" in text


def test_python_m_syncnorm_prints_version_environment_and_the_self_check(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    # What `python -m syncnorm` runs, in this process (a subprocess would spend its time importing torch).
    monkeypatch.setattr(sys, "argv", ["python -m syncnorm"])
    runpy.run_module("syncnorm", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert out.startswith(f"syncnorm {syncnorm.__version__} (")
    assert f"torch {torch.__version__}" in out
    for fact in ("CUDA: ", "NCCL ", "Gloo ", "MPI backend "):
        assert fact in out, out
    assert "python -m syncnorm.selftest" in out
