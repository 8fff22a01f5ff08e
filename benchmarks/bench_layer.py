"""Layer benchmark on CPU Gloo ranks: syncnorm vs local BatchNorm vs a naive all-reduce SyncBN.

Each rank runs one thread (``torch.set_num_threads(1)``). For every activation shape (per rank) the
variants are timed *interleaved*: every step times each variant once, in turn, so background load
hits all of them alike. A step is forward + backward of one layer on a fixed input, after a
barrier; the table shows the median over the timed steps of the slowest rank (the rank every
other rank waits for in a real step). The "A/A" row times a second, identical local BatchNorm:
its ratio to the first one is the noise of the measurement. "2 bare all-reduces" times only
syncnorm's two collectives at the layer's sizes (the communication floor). With ``--overlap`` the
prototypes of benchmarks/overlap.py are timed too. Each cell is given in wall time and in CPU time
of the rank's threads (robust to other load on the machine).

It also prints the communication model: collectives and bytes per layer and step for syncnorm
and for torch.nn.SyncBatchNorm, up to W = 1024 ranks (formulas in the table header).

The last row of each table is the overhead: syncnorm minus local BatchNorm minus the two bare
all-reduces, in ms, same run (what syncnorm's own host and kernel work costs).

Run:
    PYTHONPATH=. python benchmarks/bench_layer.py --world-sizes 2 4 --steps 30 --overlap
    PYTHONPATH=. python benchmarks/bench_layer.py --quick   # a smoke run (seconds; numbers meaningless)

Timing is never asserted anywhere; this only prints.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from overlap import AsyncBackward, OverlapBatchNorm, PipelinedForward
from torch import Tensor, nn

import syncnorm

SHAPES: dict[str, tuple[tuple[int, ...], bool]] = {
    "(32,64,28,28)": ((32, 64, 28, 28), False),
    "(32,64,28,28) CL": ((32, 64, 28, 28), True),
    "(8,256,14,14)": ((8, 256, 14, 14), False),
    "(256,512)": ((256, 512), False),
    # Where per-call cost dominates: small (N,C) features and a late 4-D layer.
    "(4,512)": ((4, 512), False),
    "(32,256,7,7)": ((32, 256, 7, 7), False),
}
OVERHEAD = "overhead: syncnorm - local BN - 2 bare all-reduces (ms)"


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks (the gradient of a sum is the sum of the gradients)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """detectron2-style SyncBN: all-reduce mean and mean of squares (float32), autograd through it.

    Assumes equal per-rank batches and loses precision when |mean| >> std; here only to time it.
    """

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        world = dist.get_world_size()
        moments = torch.cat([x.mean(dims), (x * x).mean(dims)])
        mean, mean_sq = (_AllReduceSum.apply(moments) / world).split(channels)
        var = mean_sq - mean * mean
        with torch.no_grad():
            count = x.numel() // channels * world
            self.running_mean.lerp_(mean.detach(), self.momentum)  # type: ignore[union-attr, arg-type]
            self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)  # type: ignore[union-attr, arg-type]
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        view = (1, -1, *([1] * (x.dim() - 2)))
        return x * scale.view(view) + shift.view(view)


def local_batchnorm(channels: int, dims: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if dims == 2 else nn.BatchNorm2d(channels)


class BareAllReduces(nn.Module):
    """Only syncnorm's two collectives (sizes of a C-channel layer): the communication floor of a step."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.forward_buffer = torch.zeros(2 * channels + 1, dtype=torch.float64)  # float32 input: one all-reduce
        self.backward_buffer = torch.zeros(2 * channels)

    def forward(self, x: Tensor) -> Tensor:
        dist.all_reduce(self.forward_buffer)
        return _BackwardAllReduce.apply(x, self.backward_buffer)


class _BackwardAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, buffer: Tensor) -> Tensor:  # type: ignore[override]
        ctx.buffer = buffer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        dist.all_reduce(ctx.buffer)
        return grad, None


OVERLAP_VARIANTS: dict[str, Callable[[int, int], nn.Module]] = {
    "syncnorm + async backward": lambda c, d: OverlapBatchNorm(c, AsyncBackward),
    "syncnorm + 2 channel groups fwd": lambda c, d: OverlapBatchNorm(c, PipelinedForward, 2),
    "syncnorm + 4 channel groups fwd": lambda c, d: OverlapBatchNorm(c, PipelinedForward, 4),
}

VARIANTS: dict[str, Callable[[int, int], nn.Module]] = {
    "local BatchNorm": local_batchnorm,
    "local BatchNorm (A/A)": local_batchnorm,
    "naive all-reduce SyncBN": lambda c, d: NaiveSyncBatchNorm(c),
    "syncnorm": lambda c, d: syncnorm.SyncBatchNorm(c),
    "2 bare all-reduces (comm floor)": lambda c, d: BareAllReduces(c),
}


def time_interleaved(
    names: list[str], run_step: Callable[[str], None], warmup: int, steps: int
) -> dict[str, tuple[float, float]]:
    """This rank's median (wall ms, CPU ms) of ``run_step(name)`` per variant, variants interleaved.

    Each step times every variant once, in turn, after a barrier, so slow drifts of the machine hit
    all variants alike. CPU time is ``time.process_time`` (every thread of the rank, Gloo's
    included): the work a step costs, without the time spent waiting for a peer or for a core, so
    it is robust to other load.
    """
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for step in range(warmup + steps):
        for name in names:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            run_step(name)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if step >= warmup:
                wall[name].append(elapsed * 1e3)
                cpu[name].append(elapsed_cpu * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in names}


def time_variants(
    variants: dict[str, nn.Module], x: Tensor, dy: Tensor, warmup: int, steps: int
) -> dict[str, tuple[float, float]]:
    """This rank's median (wall ms, CPU ms) of forward+backward per layer variant, interleaved."""
    inputs = {name: x.detach().clone().requires_grad_() for name in variants}

    def run_step(name: str) -> None:
        inputs[name].grad = None
        variants[name].zero_grad(set_to_none=True)
        variants[name](inputs[name]).backward(dy)

    return time_interleaved(list(variants), run_step, warmup, steps)


def join_gloo_world(rank: int, world: int, port: int, timeout_s: float) -> None:
    """One benchmark rank: one compute thread, in a Gloo world on 127.0.0.1:``port``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    join_gloo_world(rank, world, port, timeout_s=120)
    variant_factories = dict(VARIANTS)
    if args.overlap:
        variant_factories.update(OVERLAP_VARIANTS)
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for shape_name in args.shapes:
        shape, channels_last = SHAPES[shape_name]
        torch.manual_seed(rank)
        x = torch.randn(shape) * 2 + 3
        dy = torch.randn(shape)
        if channels_last:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        layers = {name: factory(shape[1], len(shape)) for name, factory in variant_factories.items()}
        mine = time_variants(layers, x, dy, args.warmup, args.steps)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        # The slowest rank's median, for wall and for CPU time separately.
        rows[shape_name] = {name: (max(r[name][0] for r in everyone), max(r[name][1] for r in everyone))
                            for name in mine}
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(world: int, args: argparse.Namespace) -> dict[str, dict[str, tuple[float, float]]]:
    """Spawn ``world`` Gloo ranks, time every variant at every shape; slowest rank's medians (ms)."""
    context = mp.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_rank_main, args=(r, world, port, args, out))
             for port in [_free_port()] for r in range(world)]
    for p in procs:
        p.start()
    try:
        rows: dict[str, dict[str, tuple[float, float]]] = out.get(timeout=args.timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return rows


def print_layer_table(world: int, rows: dict[str, dict[str, tuple[float, float]]],
                      baseline: str = "local BatchNorm") -> None:
    cores = os.cpu_count() or 1
    note = f" (oversubscribes {cores} cores: {world} single-thread ranks)" if world > cores else ""
    variants = list(next(iter(rows.values())))
    for column, what in ((0, "wall ms"), (1, "CPU ms of the rank's threads")):
        print(f"\nW={world} Gloo ranks, 1 thread each{note}; fwd+bwd {what}, slowest rank's median "
              f"(ratio to {baseline} in the same run)")
        print("| variant | " + " | ".join(rows) + " |")
        print("|" + "---|" * (len(rows) + 1))
        for name in variants:
            cells = [f"{rows[s][name][column]:.2f} ({rows[s][name][column] / rows[s][baseline][column]:.2f}x)"
                     for s in rows]
            print(f"| {name} | " + " | ".join(cells) + " |")
        # What syncnorm costs beyond the local arithmetic and the communication floor, same run.
        floor = "2 bare all-reduces (comm floor)"
        if "syncnorm" in variants and floor in variants:
            cells = [f"{rows[s]['syncnorm'][column] - rows[s][baseline][column] - rows[s][floor][column]:.2f}"
                     for s in rows]
            print(f"| {OVERHEAD} | " + " | ".join(cells) + " |")


def communication_rows(channels: int, world: int) -> tuple[int, int, float, float]:
    """Per layer and training step, for one rank: (syncnorm payload B, torch payload B, syncnorm wire B,
    torch wire B).

    Payload = what the collectives hand back to the rank: syncnorm's forward all-reduce of 2C+1
    float64 (count, sums and sums of squares about zero) and backward all-reduce of 2C float32,
    whatever W; torch.nn.SyncBatchNorm's forward
    all_gather of W*(2C+1) float32 (mean, invstd, count of every rank) and the same backward
    all-reduce. Wire = bytes a rank sends with bandwidth-optimal ring algorithms: an all-reduce of S
    bytes sends 2(W-1)/W*S, an all_gather of W pieces of S bytes sends (W-1)*S.
    """
    fwd, bwd, gathered = (2 * channels + 1) * 8, 2 * channels * 4, (2 * channels + 1) * 4
    ring = 2 * (world - 1) / world
    return fwd + bwd, world * gathered + bwd, ring * (fwd + bwd), (world - 1) * gathered + ring * bwd


def print_communication_table(channels_list: list[int], worlds: tuple[int, ...] = (2, 8, 64, 1024)) -> None:
    print("\nCommunication per layer per training step, one rank (model, see communication_rows):\n"
          "syncnorm: 1 all-reduce of (2C+1) float64 forward + 1 all-reduce of 2C float32 backward; "
          "payload (2C+1)*8 + 2C*4 B for any W, ring wire 2(W-1)/W times that.\n"
          "torch.nn.SyncBatchNorm: 1 all_gather of W*(2C+1) float32 forward + 1 all-reduce of 2C float32 "
          "backward; payload W*(2C+1)*4 + 2C*4 B, ring wire (W-1)*(2C+1)*4 + 2(W-1)/W*2C*4 B.")
    print("| C | W | collectives (both) | syncnorm payload B | torch payload B | syncnorm wire B "
          "| torch wire B | torch / syncnorm (wire) |")
    print("|---|---|---|---|---|---|---|---|")
    for channels in channels_list:
        for w in worlds:
            sp, tp, sw, tw = communication_rows(channels, w)
            print(f"| {channels} | {w} | 2 (1 fwd + 1 bwd) | {sp:,} | {tp:,} | {sw:,.0f} | {tw:,.0f} "
                  f"| {tw / sw:.1f}x |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=30, help="timed steps (median over them)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up on the ranks")
    parser.add_argument("--overlap", action="store_true", help="also time the overlap prototypes of overlap.py")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: W=2, the small shapes, 2 warm-up + 3 timed steps (numbers meaningless)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.world_sizes, args.shapes, args.warmup, args.steps = [2], ["(4,512)", "(256,512)"], 2, 3
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average before "
          f"{os.getloadavg()[0]:.1f}; shapes are per rank; "
          f"{args.warmup} warm-up + {args.steps} timed steps, variants interleaved")
    for world in args.world_sizes:
        rows = measure(world, args)
        print_layer_table(world, rows)
        print(f"(load average after: {os.getloadavg()[0]:.1f})")
    print("torch.nn.SyncBatchNorm: not measured (it refuses CPU tensors; see benchmarks/gpu.sh for CUDA).")
    print_communication_table(sorted({SHAPES[s][0][1] for s in args.shapes}))


if __name__ == "__main__":
    main()
