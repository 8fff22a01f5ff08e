"""Host cost of one training step of one layer: local BatchNorm vs syncnorm, collectives taken out.

At small per-GPU batches a BatchNorm layer's kernels take microseconds and the host decides the step:
Python, autograd, op dispatch, launches. This measures that host work on CPU, in one process:

- a no-op ("fake") process group of world size 2, so syncnorm's synchronised path runs (two
  ``c10d.allreduce_`` a step, counted and printed) and the collectives cost only their Python and
  dispatch; one thread (``torch.set_num_threads(1)``);
- one training-mode layer, forward + backward on a fixed input, gradients set to None each step;
- ALTERNATING rounds: each round times every path for ``--steps`` steps, in an order that rotates
  from round to round, so drifts of a shared machine hit every path alike. Times are medians over
  rounds of the per-step time; ratios are medians of the per-round ratios to local BatchNorm.

Paths (columns):

- ``local``: ``torch.nn.BatchNorm1d/2d/3d``; a second local layer gives the A/A column (noise);
- ``native``: syncnorm with ``SYNCNORM_KERNELS=native``, as it runs on CPU (aten ops);
- ``native floor``: the native path's per-element aten kernels and its two all-reduces in a bare
  autograd.Function, with no per-channel arithmetic, checks or bookkeeping (``NativeFloor``): what any
  layer built from those kernels pays, so the gap to ``native`` is what syncnorm adds on the host;
- ``GPU path``: syncnorm with ``SYNCNORM_KERNELS=fused`` and the Triton per-channel kernels, what a
  GPU runs, with every kernel body replaced by a no-op that returns outputs of the right shape and
  dtype: CPU stand-ins for torch's CUDA-only fused kernels (``batch_norm_stats``, ``batch_norm_elemt``,
  ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``, registered with ``torch.library``)
  that only allocate their outputs, and Triton launches that do nothing (the kernels are made under
  ``TRITON_INTERPRET=1``, which is how syncnorm runs its Triton kernels on CPU tensors, and
  Triton's interpreter launch is replaced by a counter). So it counts the Python, autograd, dispatch
  and custom-op work of a GPU step, without the kernels' compute and without the launches themselves
  (a CUDA launch, or a Triton launch's own argument binding, adds a few us each on a GPU host).
  Differences from a GPU host that remain: a stand-in is a Python function where the real op is C++;
  ``torch.cuda.device`` contexts and CUDA allocator calls are not made; ``SYNCNORM_KERNELS=fused`` is
  set explicitly, so syncnorm checks that the fused ops exist for the device (four dispatcher
  look-ups, once: the answer is cached), which the default on a CUDA tensor skips.

The checks table shows, for one step of each path, the collectives, host syncs (``.item()`` and
friends), syncnorm custom ops (none in eager steps: they launch the Triton kernels directly, the custom
ops are what torch.compile traces) and Triton launches seen: a path that silently fell back (no Triton
launch, no all-reduce) shows there. ``--profile PATH`` prints where one path's host time goes
(cProfile by function, sorted by own time, and torch.profiler by op) instead of the table.

Run:
    PYTHONPATH=. python benchmarks/bench_host.py                      # the table (a minute or two)
    PYTHONPATH=. python benchmarks/bench_host.py --quick              # a smoke run (seconds; numbers meaningless)
    PYTHONPATH=. python benchmarks/bench_host.py --profile gpu --profile-shape "(8, 256) float32"

Timing is never asserted anywhere; this only prints.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import os
import platform
import pstats
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import syncnorm

SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "(2, 8) float32": ((2, 8), torch.float32),
    "(8, 256) float32": ((8, 256), torch.float32),
    "(2, 64, 4, 4) float32": ((2, 64, 4, 4), torch.float32),
    "(4, 32, 4, 4) bfloat16": ((4, 32, 4, 4), torch.bfloat16),
    "(2, 16, 8) float32": ((2, 16, 8), torch.float32),
    "(1, 8, 2, 4, 4) float32": ((1, 8, 2, 4, 4), torch.float32),
}
PATHS = ("local", "local A/A", "native", "floor", "gpu", "gpu floor")
TITLES = {"local": "local BatchNorm", "local A/A": "local A/A", "native": "syncnorm native (CPU)",
          "floor": "native floor (its per-element kernels + its 2 all-reduces, nothing else)",
          "gpu": "syncnorm GPU path (fused + Triton, kernels stubbed)",
          "gpu floor": "GPU floor (its fused-op calls, Triton launches and 2 all-reduces, nothing else)"}
_SYNCS = ("_local_scalar_dense", "item", "nonzero", "masked_select", "equal", "is_nonzero")


# --- the GPU path's stand-ins: every kernel body a no-op that allocates its outputs --------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats_stub(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    channels, acc = x.shape[1], _acc(x.dtype)
    return x.new_empty(channels, dtype=acc), x.new_empty(channels, dtype=acc)


def _elemt_stub(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
                eps: float) -> Tensor:
    return torch.empty_like(x)


def _backward_reduce_stub(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                          input_g: bool, weight_g: bool, bias_g: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    channels = x.shape[1]
    param_dtype = mean.dtype if weight is None else weight.dtype
    return (mean.new_empty(channels if input_g else 0), mean.new_empty(channels if input_g else 0),
            mean.new_empty(channels if weight_g else 0, dtype=param_dtype),
            mean.new_empty(channels if bias_g else 0, dtype=param_dtype))


def _backward_elemt_stub(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                         sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor) -> Tensor:
    return torch.empty_like(x)


_STUBS: dict[str, Callable[..., Any]] = {
    "batch_norm_stats": _stats_stub,
    "batch_norm_elemt": _elemt_stub,
    "batch_norm_backward_reduce": _backward_reduce_stub,
    "batch_norm_backward_elemt": _backward_elemt_stub,
}


def register_stubs() -> torch.library.Library:
    """CPU kernels for torch's CUDA-only fused ops that only allocate (keep the Library alive)."""
    library = torch.library.Library("aten", "IMPL")
    for name, fn in _STUBS.items():
        library.impl(name, fn, "CPU")
    return library


class TritonLaunches:
    """Counts the Triton launches (``kernel[grid](...)``) made while ``stubbed()`` is active, and runs none."""

    def __init__(self) -> None:
        self.count = 0
        self.available = True
        try:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
        except ImportError:
            self.available = False
            return
        # Interpreted kernels (made under TRITON_INTERPRET=1) and compiled ones alike.
        self._originals: dict[Any, Any] = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    @contextlib.contextmanager
    def stubbed(self) -> Iterator[None]:
        if not self.available:
            yield
            return

        def run(kernel: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            self.count += 1

        for cls in self._originals:
            cls.run = run
        try:
            yield
        finally:
            for cls, original in self._originals.items():
                cls.run = original


@contextlib.contextmanager
def environment(**values: Optional[str]) -> Iterator[None]:
    """Set (str) or unset (None) environment variables for the block, then restore them."""
    previous = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def path_context(path: str, launches: TritonLaunches) -> contextlib.AbstractContextManager[None]:
    """The kernel setting of ``path`` (syncnorm reads SYNCNORM_KERNELS and TRITON_INTERPRET per call)."""
    if path == "native":
        return environment(SYNCNORM_KERNELS="native", TRITON_INTERPRET=None)
    if path in ("gpu", "gpu floor"):
        stack = contextlib.ExitStack()
        stack.enter_context(environment(SYNCNORM_KERNELS="fused", TRITON_INTERPRET="1"))
        stack.enter_context(launches.stubbed())
        return stack
    return environment(SYNCNORM_KERNELS=None, TRITON_INTERPRET=None)


# --- a step ---------------------------------------------------------------------------------------------


def make_layer(path: str, shape: tuple[int, ...]) -> nn.Module:
    channels = shape[1]
    if path.startswith("local"):
        local = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
        return local(channels)
    if path == "floor":
        return NativeFloor(channels)
    if path == "gpu floor":
        return GpuFloor(channels)
    return syncnorm.SyncBatchNorm(channels)


class NativeFloor(nn.Module):
    """What any layer built from the native path's kernels pays: its per-element aten kernels (a sum, ``x - c``,
    the reduction, the normalisation; backward: the reduction, ``x - m``, the affine pass, the ``dy`` term) and
    its two all-reduces of the same sizes, in a bare autograd.Function, with NO per-channel arithmetic (the
    statistics are not even right), no checks and no bookkeeping. The gap between it and syncnorm native is
    the per-channel work and the Python around it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = _FloorFunction.apply(x, self.weight, self.bias)
        return output


class _FloorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x32 = x.float() if x.dtype != torch.float32 else x
        dims = [0, *range(2, x.dim())]
        c = x32.mean(dims)
        view = c.view(1, -1, *([1] * (x.dim() - 2)))
        deviations = torch.sub(x32, view)
        zeros = torch.zeros_like(c)
        torch.ops.aten.native_batch_norm_backward(deviations, deviations, None, zeros, zeros, None, None, False, 1.0,
                                                  [False, True, True])
        dist.all_reduce(torch.empty(1 + 2 * c.numel(), dtype=torch.float64))
        out = torch.ops.aten.native_batch_norm(deviations, weight, bias, zeros, zeros, False, 0.0, 1.0)[0]
        ctx.save_for_backward(x32, c, weight, zeros)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x32, c, weight, zeros = ctx.saved_tensors
        _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.float(), x32, None, c, zeros, None, None, False, 1.0, [False, True, True])
        sums = torch.stack([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums)
        grad = torch.sub(x32, c.view(1, -1, *([1] * (x32.dim() - 2))))
        grad.addcmul_(dy, weight.view(1, -1, *([1] * (x32.dim() - 2))))
        return grad.to(dy.dtype), sum_dy_xmu, sum_dy


class GpuFloor(NativeFloor):
    """What any layer built from the GPU path's kernels pays: the same fused-op calls (stubbed as in the GPU path:
    ``batch_norm_stats``, ``batch_norm_backward_reduce`` for the moment, ``batch_norm_elemt``; backward:
    ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``), its two Triton launches (pack, finish; stubbed)
    and its two all-reduces of the same sizes, in a bare autograd.Function with NO per-channel arithmetic, checks or
    bookkeeping. The gap between it and the GPU path is what syncnorm adds on the host of a GPU step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = _GpuFloorFunction.apply(x, self.weight, self.bias)
        return output


class _GpuFloorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from syncnorm import _triton

        channels = x.shape[1]
        mean, invstd = torch.batch_norm_stats(x, 1e-30)
        torch.batch_norm_backward_reduce(x, x, mean, invstd, None, True, False, False)
        packed = torch.empty(1 + 2 * channels, dtype=torch.float64)
        _triton._launch(0, channels, mean, invstd, packed)
        dist.all_reduce(packed)
        block = packed.new_empty(8, channels, dtype=torch.float32)
        count = packed.new_empty(1, dtype=torch.int32)
        _triton._launch(1, channels, packed, block, count)
        ctx.save_for_backward(x, weight, block, count)
        return torch.batch_norm_elemt(x, weight, bias, block[0], block[1], 0.0)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight, block, count = ctx.saved_tensors
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(dy, x, block[0], block[1], weight, True, False,
                                                                     False)
        sums = torch.empty(2, x.shape[1])
        dist.all_reduce(sums)
        grad = torch.batch_norm_backward_elemt(dy, x, block[0], block[1], weight, sums[0], sums[1], count)
        return grad, sum_dy_xmu, sum_dy


def make_step(layer: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[], None]:
    """One training step of ``layer``: forward + backward on a fixed input, gradients set to None first."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 2 + 3).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(dtype)
    parameters = list(layer.parameters())

    def step() -> None:
        x.grad = None
        for parameter in parameters:
            parameter.grad = None
        layer(x).backward(dy)

    return step


class CountOps(TorchDispatchMode):
    """Collectives, host syncs and syncnorm custom ops dispatched in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.name())] += 1
        return func(*args, **(kwargs or {}))

    def allreduces(self) -> int:
        return sum(n for name, n in self.ops.items() if name.startswith("c10d::allreduce"))

    def syncs(self) -> int:
        return sum(n for name, n in self.ops.items() if name.split("::")[-1].split(".")[0] in _SYNCS)

    def custom(self) -> int:
        return sum(n for name, n in self.ops.items() if name.startswith("syncnorm::"))


def check(path: str, step: Callable[[], None], launches: TritonLaunches) -> dict[str, int]:
    """What one steady-state step of ``path`` dispatches (untimed).

    A first step warms the layer (kernel look-ups, Triton compilation); the steps after it are the ones timed.
    """
    with path_context(path, launches):
        step()
        before = launches.count
        with CountOps() as counted:
            step()
        return {"all-reduces": counted.allreduces(), "host syncs": counted.syncs(),
                "syncnorm ops": counted.custom(), "Triton launches": launches.count - before}


# --- timing ---------------------------------------------------------------------------------------------


def time_rounds(steps: dict[str, Callable[[], None]], launches: TritonLaunches, rounds: int, steps_per_round: int,
                warmup: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Per-round per-step seconds of each path, paths alternating (order rotated each round)."""
    paths = list(steps)
    for path in paths:
        with path_context(path, launches):
            for _ in range(warmup):
                steps[path]()
    per_round: dict[str, list[float]] = {path: [] for path in paths}
    for round_index in range(rounds):
        order = paths[round_index % len(paths):] + paths[: round_index % len(paths)]
        gc.collect()
        for path in order:
            step = steps[path]
            with path_context(path, launches):
                start = clock()
                for _ in range(steps_per_round):
                    step()
                per_round[path].append((clock() - start) / steps_per_round)
    return per_round


def summarise(per_round: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Per path: (median us per step, median over rounds of the ratio to local BatchNorm)."""
    local = per_round["local"]
    return {path: (statistics.median(times) * 1e6, statistics.median(t / b for t, b in zip(times, local)))
            for path, times in per_round.items()}


# --- output ---------------------------------------------------------------------------------------------


def command_line() -> str:
    return "PYTHONPATH=. python benchmarks/bench_host.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])


def versions() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (no GPU-path column)"
    return (f"torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}, "
            f"{platform.machine()}, {torch.get_num_threads()} thread")


def print_tables(results: dict[str, dict[str, tuple[float, float]]], checks: dict[str, dict[str, dict[str, int]]],
                 args: argparse.Namespace) -> None:
    print("| shape (per rank) | local BatchNorm | syncnorm native (CPU) | ratio | native floor | ratio | GPU path "
          "(fused + Triton, kernels stubbed) | ratio | GPU floor | ratio | local A/A ratio (noise) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, row in results.items():
        gpu = " | ".join(f"{row[p][0]:.0f} us | {row[p][1]:.2f}x" if p in row else "n/a | n/a"
                         for p in ("gpu", "gpu floor"))
        print(f"| {shape} | {row['local'][0]:.0f} us | {row['native'][0]:.0f} us | {row['native'][1]:.2f}x | "
              f"{row['floor'][0]:.0f} us | {row['floor'][1]:.2f}x | {gpu} | {row['local A/A'][1]:.2f}x |")
    clock = "wall time" if args.clock == "wall" else "CPU time of the thread"
    print(f"\nHost time ({clock}) per training step of one layer (forward + backward), median of {args.rounds} "
          f"alternating rounds of {args.steps} steps; ratios are medians of per-round ratios to local BatchNorm. "
          f"No-op process group of world size 2, one thread; {versions()}. Command: `{command_line()}`\n")
    print("| shape | path | all-reduces | host syncs | syncnorm ops | Triton launches |")
    print("|---|---|---|---|---|---|")
    for shape, per_path in checks.items():
        for path, counts in per_path.items():
            print(f"| {shape} | {path} | {counts['all-reduces']} | {counts['host syncs']} | {counts['syncnorm ops']} "
                  f"| {counts['Triton launches']} |")
    print("\nDispatched in one step of each syncnorm path (TorchDispatchMode; Triton launches counted where they "
          "are stubbed). Expected: 2 all-reduces, 0 host syncs, and Triton launches on the GPU path only.")
    for shape, per_path in checks.items():
        for path, counts in per_path.items():
            if counts["all-reduces"] != 2 or (path == "gpu" and counts["Triton launches"] == 0):
                print(f"WARNING: {shape} {path}: {counts}: the synchronised path (or its Triton kernels) did not run "
                      "as on a GPU; the figures above do not measure it.")


def profile(path: str, shape_name: str, steps: int, launches: TritonLaunches) -> None:
    """Where one path's host time goes: cProfile by function (own time), then torch.profiler by op."""
    shape, dtype = SHAPES[shape_name]
    step = make_step(make_layer(path, shape), shape, dtype)
    with path_context(path, launches):
        for _ in range(20):
            step()
        profiler = cProfile.Profile()
        profiler.enable()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - start
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(f"## cProfile: {TITLES[path]}, {shape_name}, {steps} steps ({elapsed / steps * 1e6:.0f} us a step "
              f"under the profiler); command: `{command_line()}`\n")
        print(out.getvalue())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(min(steps, 200)):
                step()
        print(f"## torch.profiler by op: {TITLES[path]}, {shape_name}, {min(steps, 200)} steps\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds (medians over them)")
    parser.add_argument("--steps", type=int, default=100, help="steps a path per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps a path before the first round")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this thread's CPU time (less sensitive to other load on the machine)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds of 5 steps")
    parser.add_argument("--profile", choices=("local", "native", "floor", "gpu", "gpu floor"),
                        help="print where this path's host time goes instead of the table")
    parser.add_argument("--profile-shape", default="(8, 256) float32", choices=list(SHAPES))
    parser.add_argument("--profile-steps", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.profile_steps = 3, 5, 2, 20
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    stubs = register_stubs()
    launches = TritonLaunches()
    paths = [p for p in PATHS if not p.startswith("gpu") or launches.available]
    try:
        if args.profile:
            profile(args.profile, args.profile_shape, args.profile_steps, launches)
            return
        results: dict[str, dict[str, tuple[float, float]]] = {}
        checks: dict[str, dict[str, dict[str, int]]] = {}
        for shape_name in args.shapes:
            shape, dtype = SHAPES[shape_name]
            steps = {path: make_step(make_layer(path, shape), shape, dtype) for path in paths}
            checks[shape_name] = {path: check(path, steps[path], launches) for path in paths
                                  if path in ("native", "gpu")}
            clock = time.thread_time if args.clock == "cpu" else time.perf_counter
            results[shape_name] = summarise(time_rounds(steps, launches, args.rounds, args.steps, args.warmup, clock))
        print_tables(results, checks, args)
    finally:
        del stubs
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
