"""``python -m syncnorm``: the version, and what this environment offers syncnorm (torch, backends, devices).

It starts no process group and runs nothing on the devices; the self-check that does is
``python -m syncnorm.selftest``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from typing import Optional

import torch
import torch.distributed as dist

import syncnorm


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def environment() -> list[str]:
    """One line per fact: versions, the torch.distributed backends this torch build has, the devices."""
    lines = [
        f"syncnorm {syncnorm.__version__} ({syncnorm.__file__})",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__}",
    ]
    if not dist.is_available():
        lines.append("torch.distributed: not available in this torch build (syncnorm is plain BatchNorm here)")
        return lines
    cuda = torch.cuda.is_available()
    nccl = dist.is_nccl_available()
    nccl_version = ""
    if nccl:
        try:
            nccl_version = " " + ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # a CPU-only build can report NCCL without being able to load it
            nccl_version = ""
    mpi4py = importlib.util.find_spec("mpi4py") is not None
    lines += [
        f"CUDA: {_yes(cuda)}" + (f" (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else ""),
        f"backends: NCCL {_yes(nccl)}{nccl_version} (GPUs only), Gloo {_yes(dist.is_gloo_available())}, "
        f"MPI backend {_yes(dist.is_mpi_available())} (launch/mpirun.sh needs only mpi4py: {_yes(mpi4py)})",
    ]
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append(f"devices: CPU only ({torch.get_num_threads()} thread(s)): train on Gloo")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m syncnorm", description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    print("\n".join(environment()))
    print("self-check of syncnorm on this machine: python -m syncnorm.selftest")


if __name__ == "__main__":
    main()
