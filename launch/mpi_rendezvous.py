"""Run a torch.distributed training script as one MPI rank: MPI's rank and size become torchrun's variables.

``launch/mpirun.sh`` starts ``python launch/mpi_rendezvous.py SCRIPT ARGS...`` on every rank. Each rank reads
its rank, the world size and its rank on the node from mpi4py, rank 0 picks a free port and broadcasts it,
and the script then runs unchanged with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, exactly as under torchrun (``init_process_group()`` reads them).
``MASTER_ADDR`` / ``MASTER_PORT`` already in the environment win.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python launch/mpi_rendezvous.py SCRIPT [ARGS...] (started by launch/mpirun.sh)")
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks of this machine, for LOCAL_RANK (one GPU each)
    hosts = world.allgather(socket.gethostname())
    # One machine: loopback. Several: rank 0's address, which every rank can reach.
    address = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
    port = world.bcast(_free_port() if world.rank == 0 else None, root=0)
    os.environ.setdefault("MASTER_ADDR", address)
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.size), LOCAL_RANK=str(node.rank),
                      LOCAL_WORLD_SIZE=str(node.size))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` would
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
