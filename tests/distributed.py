"""Real Gloo ranks for the tests: one pool of spawned processes per world size, reused by many tests.

``run_on_ranks(world_size, fn, *args)`` runs ``fn(*args)`` on every rank of an initialised Gloo
world and returns the per-rank results, in rank order. ``fn`` must be a module-level function of
an importable module (the test files are). If a rank raises, every rank's traceback is shown; if
the ranks do not answer within the timeout, the pool is killed and the test fails (never hangs).

Inside a rank, ``COLLECTIVES`` records every torch.distributed collective that Python code issues
(name, number of elements, bytes), so tests can assert the communication budget exactly.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import io
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

TASK_TIMEOUT_S = 120.0
GROUP_TIMEOUT_S = 60.0


@dataclass
class CollectiveLog:
    """The collectives one rank issued since the last ``reset()``."""

    calls: list[tuple[str, int, int]] = field(default_factory=list)

    def reset(self) -> None:
        self.calls.clear()

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def bytes(self) -> list[int]:
        return [nbytes for _, _, nbytes in self.calls]


COLLECTIVES = CollectiveLog()

_COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
            "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "gather", "scatter",
            "all_gather_object", "broadcast_object_list")


def _count_collectives() -> None:
    import torch.distributed as dist

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
            numel = tensor.numel() if isinstance(tensor, torch.Tensor) else 0
            nbytes = numel * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
            COLLECTIVES.calls.append((name, numel, nbytes))
            return original(*args, **kwargs)

        return wrapper

    for name in _COUNTED:
        setattr(dist, name, counting(name, getattr(dist, name)))


def _serialise(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import fused_cpu
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Every rank can run the fused backend on CPU tensors; a test picks it with use_kernels("fused").
    fused_cpu.register()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )
    _count_collectives()
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        COLLECTIVES.reset()
        try:
            results.put((rank, True, _serialise(fn(*args))))
        except BaseException:  # report everything, including assertion errors, to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RankPool:
    """``world_size`` spawned processes in one Gloo world, running the same task on every rank."""

    def __init__(self, world_size: int) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.results = context.Queue()
        self.tasks = [context.Queue() for _ in range(world_size)]
        port = _free_port()
        self.processes = [
            context.Process(target=_worker, args=(rank, world_size, port, self.tasks[rank], self.results),
                            daemon=True)
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = TASK_TIMEOUT_S) -> list[Any]:
        for task_queue in self.tasks:
            task_queue.put((fn, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(outcomes) < self.world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, payload = self.results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                self.close()
                missing = sorted(set(range(self.world_size)) - set(outcomes))
                errors = _format_errors(outcomes)
                raise AssertionError(
                    f"{fn.__name__}: ranks {missing} did not answer within {timeout:.0f} s (a hang); "
                    f"the pool was killed.{errors}"
                ) from None
            outcomes[rank] = (ok, payload)
        if not all(ok for ok, _ in outcomes.values()):
            raise AssertionError(f"{fn.__name__} failed on some ranks:{_format_errors(outcomes)}")
        return [torch.load(io.BytesIO(outcomes[rank][1]), weights_only=False) for rank in range(self.world_size)]

    def close(self) -> None:
        self.broken = True
        for task_queue in self.tasks:
            try:
                task_queue.put(None)
            except (ValueError, OSError):
                pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def _format_errors(outcomes: dict[int, tuple[bool, Any]]) -> str:
    return "".join(f"\n--- rank {rank} ---\n{payload}" for rank, (ok, payload) in sorted(outcomes.items())
                   if not ok)


_POOLS: dict[int, RankPool] = {}


def run_on_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = TASK_TIMEOUT_S,
                 fresh: bool = False) -> list[Any]:
    """Run ``fn(*args)`` on every rank of a Gloo world of ``world_size`` processes; per-rank results.

    ``fresh``: in new processes (the pool of that size is replaced), e.g. to measure memory without what
    hundreds of earlier tests left in the processes' allocators.
    """
    pool = _POOLS.get(world_size)
    if fresh and pool is not None and not pool.broken:
        pool.close()
    if pool is None or pool.broken or fresh:
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool.run(fn, *args, timeout=timeout)


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        if not pool.broken:
            pool.close()


# A test's kernel setting: SYNCNORM_KERNELS, and whether the per-channel Triton kernels run (their
# interpreter on CPU tensors, TRITON_INTERPRET=1, as the kernels run on a GPU). "fused" runs what a GPU
# runs: torch's fused kernels (CPU stand-ins) and the Triton epilogues; "native" what a CPU runs: aten only.
KERNEL_SETTINGS = {
    "native": ("native", None),
    "fused": ("fused", "1"),
    "native-triton": ("native", "1"),
    "fused-aten": ("fused", None),
}


@contextlib.contextmanager
def use_kernels(kernels: Optional[str]) -> Iterator[None]:
    """Run the block with the kernel setting ``kernels`` (a KERNEL_SETTINGS key; None: as it is), then restore."""
    if kernels is None:
        yield
        return
    setting = dict(zip(("SYNCNORM_KERNELS", "TRITON_INTERPRET"), KERNEL_SETTINGS[kernels]))
    previous = {name: os.environ.get(name) for name in setting}
    for name, value in setting.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def rank() -> int:
    """This process's rank (inside a task)."""
    import torch.distributed as dist

    return dist.get_rank()


def my_slice(batch: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """This rank's part of a global batch split along dim 0 into ``sizes``."""
    return batch.split(sizes)[rank()].clone()


os.environ.setdefault("OMP_NUM_THREADS", "1")
