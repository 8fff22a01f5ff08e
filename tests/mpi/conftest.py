"""The pytest-mpi lane: every MPI rank is a pytest process; mpi4py gives rank, size and the rendezvous.

Run with ``mpirun -n 2 python -m pytest --with-mpi tests/mpi`` (and ``-n 3``); ``tests/mpi/run.sh N`` does
that and also checks that every one of the N ranks ran tests. Without ``--with-mpi`` the tests are skipped.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# tests/reference.py (the float64 oracle) lives one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def gloo_world() -> Iterator[tuple[int, int]]:
    """A Gloo process group over MPI's ranks: rank 0 picks a free port and broadcasts it over MPI."""
    import torch.distributed as dist
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    hosts = comm.allgather(socket.gethostname())
    # One machine: loopback. Several: rank 0's address, which every rank can reach.
    host = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
    port = comm.bcast(_free_port() if comm.rank == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=comm.rank, world_size=comm.size,
                            timeout=datetime.timedelta(seconds=60))
    yield comm.rank, comm.size
    dist.destroy_process_group()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under --with-mpi, fail a rank that ran no test, and leave a note per rank for tests/mpi/run.sh."""
    if not session.config.getoption("with_mpi", default=False):
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    reporter: Any = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter is not None else 0
    expected = os.environ.get("SYNCNORM_MPI_SIZE")
    problem = ""
    if passed == 0:
        problem = f"rank {comm.rank} of {comm.size} ran no test (min_size=2 tests skip on 1 rank)"
    elif expected is not None and int(expected) != comm.size:
        problem = f"MPI says {comm.size} ranks, mpirun was asked for {expected}: mpi4py and mpirun do not match"
    if problem:
        print(f"\nMPI lane FAILED: {problem}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    report_dir = os.environ.get("SYNCNORM_MPI_REPORT_DIR")
    if report_dir:
        Path(report_dir, f"rank{comm.rank}").write_text(f"size={comm.size} passed={passed} problem={problem}\n")
