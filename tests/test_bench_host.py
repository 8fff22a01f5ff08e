"""benchmarks/bench_host.py runs and prints its tables; its timings are never asserted.

What is asserted is exact: every shape has a row, and each syncnorm path's step really ran the
synchronised path (two all-reduces, no host sync) and, on the GPU path, the Triton kernels' launches.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_host  # noqa: E402


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_output() -> str:
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("SYNCNORM_KERNELS", "TRITON_INTERPRET"):
        environment.pop(name, None)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host.py"), "--quick"], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"bench_host.py --quick exited with {result.returncode}:\n{result.stderr}"
    return result.stdout


def _rows(output: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_quick_run_prints_a_timing_row_for_every_shape_and_the_command(quick_output: str) -> None:
    header = ("| shape (per rank) | local BatchNorm | syncnorm native (CPU) | ratio | native floor | ratio | GPU path "
              "(fused + Triton, kernels stubbed) | ratio | GPU floor | ratio |")
    assert header in quick_output
    for shape in bench_host.SHAPES:
        rows = [row for row in _rows(quick_output, shape) if len(row) == 11]
        assert len(rows) == 1, f"no timing row for {shape}:\n{quick_output}"
        assert rows[0][1].endswith(" us") and rows[0][2].endswith(" us") and rows[0][3].endswith("x"), rows[0]
    assert "Command: `PYTHONPATH=. python benchmarks/bench_host.py --quick`" in quick_output


def test_quick_run_checks_that_every_syncnorm_path_synchronises_without_host_syncs(quick_output: str) -> None:
    paths = ["native", "gpu"] if _triton_installed() else ["native"]
    for shape in bench_host.SHAPES:
        checks = {row[1]: row[2:] for row in _rows(quick_output, shape) if len(row) == 6}
        assert sorted(checks) == sorted(paths), f"{shape}: {checks}"
        for path, (allreduces, syncs, custom_ops, launches) in checks.items():
            assert (allreduces, syncs) == ("2", "0"), f"{shape} {path}: {checks[path]}"
            if path == "gpu":
                # Eager steps launch the Triton kernels directly: the custom ops are for torch.compile only.
                assert int(launches) > 0, f"{shape}: the GPU path launched no Triton kernel"
                assert custom_ops == "0", f"{shape}: an eager step went through the custom ops' wrappers"
            else:
                assert launches == "0", f"{shape}: the native path launched Triton kernels"
    assert "WARNING" not in quick_output
