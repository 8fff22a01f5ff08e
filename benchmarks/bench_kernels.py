"""CPU kernel choices of syncnorm's compute path, one process, one thread (no other rank to wait for).

Prints two tables, every number a median over interleaved repetitions of CPU time of this thread
(``time.thread_time``, so time the process spends descheduled by other load is not counted):
1. forward+backward of one layer: local ``nn.BatchNorm`` vs syncnorm's autograd Function on a
   one-rank Gloo group (its whole compute path plus two trivial all-reduces);
2. the per-element kernels syncnorm chooses between (``_stats.local_moments`` / ``_kernels``):
   x - shift by broadcast subtraction or by the eval-mode batch_norm kernel, the normalisation by
   the batch_norm kernel or by addcmul, and torch's own statistics kernel for reference.

Run:
    PYTHONPATH=. python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from syncnorm import _kernels, _stats
from syncnorm._function import SyncBatchNormFunction

SHAPES: list[tuple[tuple[int, ...], bool]] = [
    ((32, 64, 28, 28), False), ((32, 64, 28, 28), True), ((8, 256, 14, 14), False), ((256, 512), False),
]


def medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median thread CPU time (ms) of each callable, the callables interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            if i >= warmup:
                times[name].append((time.thread_time() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def label(shape: tuple[int, ...], channels_last: bool) -> str:
    return f"({','.join(map(str, shape))}){' CL' if channels_last else ''}"


def measure_shape(
    shape: tuple[int, ...], channels_last: bool, group: dist.ProcessGroup
) -> tuple[dict[str, float], dict[str, float]]:
    """(layer fwd+bwd medians, kernel medians) in ms at one activation shape."""
    torch.manual_seed(0)
    channels, reps = shape[1], 30 if len(shape) > 2 else 200
    x = torch.randn(shape) * 2 + 3
    dy = torch.randn(shape)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    bn = nn.BatchNorm1d(channels) if len(shape) == 2 else nn.BatchNorm2d(channels)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w, b = torch.ones(channels, requires_grad=True), torch.zeros(channels, requires_grad=True)
    rm, rv = torch.zeros(channels), torch.ones(channels)

    def local() -> None:
        xa.grad = None
        bn.zero_grad(set_to_none=True)
        bn(xa).backward(dy)

    def ours() -> None:
        xb.grad = w.grad = b.grad = None
        SyncBatchNormFunction.apply(xb, w, b, rm, rv, 1e-5, 0.1, group, "bench").backward(dy)

    layer = medians({"local": local, "ours": ours}, reps)
    per_channel = (1, channels, *([1] * (len(shape) - 2)))
    shift, ones = x.mean([0, *range(2, len(shape))]), torch.ones(channels)
    alpha, beta = torch.rand(channels).view(per_channel), torch.rand(channels).view(per_channel)
    var = torch.rand(channels) + 1
    rows = _kernels.channel_rows(x)
    on_rows: dict[str, Callable[[], object]] = {}
    if rows is not None:  # channels innermost: what syncnorm runs on (N, C) and channels-last input
        dy_rows = _kernels.channel_rows(dy)
        assert dy_rows is not None
        on_rows = {"x - shift: subtraction on the (values, C) view": lambda: rows - shift,
                   "normalise: addcmul on the (values, C) view": lambda: torch.addcmul(shift, rows, var),
                   "sum per channel on the (values, C) view": lambda: rows.sum(0),
                   "gradient sums on the (values, C) view": lambda: torch.ops.aten.native_batch_norm_backward(
                       dy_rows, rows, None, shift, var, None, None, False, 1e-5, [False, True, True])}
    kernels = medians({
        **on_rows,
        "sum per channel": lambda: x.sum([0, *range(2, len(shape))]),
        "gradient sums (eval-mode native_batch_norm_backward)": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, None, shift, var, None, None, False, 1e-5, [False, True, True]),
        "x - shift: subtraction": lambda: x - shift.view(per_channel),
        "x - shift: batch_norm kernel": lambda: torch.batch_norm(x, None, None, shift, ones, False, 0, 0, False),
        "normalise: batch_norm kernel": lambda: torch.batch_norm(x, ones, ones, shift, var, False, 0, 1e-5, False),
        "normalise: addcmul": lambda: torch.addcmul(beta, x, alpha),
        "syncnorm local moments (sum, x - shift, reduction)": lambda: _stats.local_moments(x),
        "torch.batch_norm_update_stats (local BatchNorm's statistics)":
            lambda: torch.batch_norm_update_stats(x, None, None, 0.0),
    }, reps)
    return layer, kernels


def main() -> None:
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f}; thread CPU time, "
          "median of interleaved repetitions")
    print("\n| shape (per rank) | local BatchNorm fwd+bwd ms | syncnorm fwd+bwd ms (1-rank Gloo) | ratio |")
    print("|---|---|---|---|")
    kernel_rows = []
    for shape, channels_last in SHAPES:
        layer, kernels = measure_shape(shape, channels_last, group)
        print(f"| {label(shape, channels_last)} | {layer['local']:.3f} | {layer['ours']:.3f} "
              f"| {layer['ours'] / layer['local']:.2f}x |")
        kernel_rows.append((label(shape, channels_last), kernels))
    names = list(dict.fromkeys(name for row in kernel_rows for name in row[1]))
    print("\n| kernel (ms) | " + " | ".join(row[0] for row in kernel_rows) + " |")
    print("|---|" + "---|" * len(kernel_rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{row[1][name]:.3f}" if name in row[1] else "-" for row in kernel_rows)
              + " |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
