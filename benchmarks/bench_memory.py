"""What autograd keeps for backward: SyncBatchNormAct vs SyncBatchNorm + LeakyReLU vs torch BatchNorm + LeakyReLU.

One training step of a net of 8 conv -> BatchNorm -> LeakyReLU blocks, on 2 Gloo ranks (one thread each;
``--world-size 1``: one process, where nothing synchronises and the saving is the same).
"saved" is the bytes of the unique storages of every tensor autograd saves during the forward
(``torch.autograd.graph.saved_tensors_hooks``), parameters excluded: what a step keeps alive until its
backward. The network's input (saved by the first convolution) is in every row. On CUDA tensors
(``--device cuda``) the peak of allocated memory over the step is printed too. Time: forward + backward
of one step (CPU: the rank's thread CPU time, robust to other load; CUDA: wall time), median over the steps
of the slower rank, the variants interleaved (every step times each once, in turn).
With ``--timm NAME`` a timm model built with ``act_layer="leaky_relu"`` (random weights, nothing downloaded) is
measured the same way, converted by ``syncnorm.convert_model`` without and with ``fuse_activation=True``.
With ``--layer`` only the normalisation and activation are timed (no convolutions): forward + backward of
one layer on its own, thread CPU time of each rank (robust to other load), median over the steps.

Run:
    PYTHONPATH=.:tests python benchmarks/bench_memory.py
    PYTHONPATH=.:tests python benchmarks/bench_memory.py --batch 16 --channels 64 --size 32 --steps 10
    PYTHONPATH=.:tests python benchmarks/bench_memory.py --timm efficientnet_b0 --batch 4 --size 96
    PYTHONPATH=.:tests python benchmarks/bench_memory.py --layer --steps 20

Timing is never asserted anywhere; this only prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

import syncnorm

BLOCKS = 8


def _norm_act(variant: str, channels: int, dims: int = 4) -> list[nn.Module]:
    if variant == "SyncBatchNormAct":
        return [syncnorm.SyncBatchNormAct(channels, activation="leaky_relu", negative_slope=0.01)]
    torch_norm = nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d
    norm = syncnorm.SyncBatchNorm(channels) if variant.startswith("syncnorm") else torch_norm(channels)
    return [norm, nn.LeakyReLU(0.01, inplace=variant.endswith("(inplace)"))]


VARIANTS = (
    "torch BatchNorm2d + LeakyReLU",
    "syncnorm SyncBatchNorm + LeakyReLU",
    "syncnorm SyncBatchNorm + LeakyReLU(inplace)",
    "SyncBatchNormAct",
)


def build(variant: str, channels: int) -> nn.Module:
    """8 blocks of conv 3x3 (no bias) -> the variant's BatchNorm and leaky ReLU; identical weights for every variant."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), *_norm_act(variant, channels)]
    return nn.Sequential(*layers)


def saved_bytes(step: Callable[[], torch.Tensor], parameters: set[int]) -> tuple[int, int, torch.Tensor]:
    """Run ``step`` (a forward); bytes and number of the unique non-parameter storages autograd saved, its output."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return sum(storages.values()), len(storages), out


def build_timm(name: str, fuse: bool) -> nn.Module:
    """timm's ``name`` with leaky ReLU activations, random weights, converted (and fused, or not)."""
    import warnings

    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, act_layer="leaky_relu", pretrained=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfused layers' note: the table says how many were fused
        return syncnorm.convert_model(model, fuse_activation=fuse)


def rank_measure(shape: tuple[int, ...], steps: int, device: str, timm_name: str = "") -> dict[str, Any]:
    """On one rank: saved bytes, peak (CUDA) and step times of every variant."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if timm_name:
        models = {f"{timm_name} {v}": build_timm(timm_name, v == "fused").to(device).train()
                  for v in ("converted", "fused")}
    else:
        models = {v: build(v, shape[1]).to(device).train() for v in VARIANTS}
    x = torch.randn(shape, device=device, generator=None)
    results: dict[str, Any] = {v: {"times": []} for v in models}
    # CPU: the rank's thread CPU time (robust to other load on the machine); CUDA: wall time.
    clock = time.perf_counter if device == "cuda" else time.thread_time
    for v, model in models.items():
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        nbytes, count, out = saved_bytes(lambda: model(x), parameters)  # noqa: B023 (called at once)
        out.square().mean().backward()
        fused = sum(isinstance(m, syncnorm.SyncBatchNormAct) for m in model.modules())
        results[v].update(saved=nbytes, tensors=count, fused=fused)
        if device == "cuda":
            results[v]["peak"] = torch.cuda.max_memory_allocated() - before
        del out
    for _ in range(steps):
        for v, model in models.items():
            dist.barrier()
            start = clock()
            model(x).square().mean().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            results[v]["times"].append(clock() - start)
            model.zero_grad(set_to_none=True)
    return results


def rank_layer_times(shapes: list[tuple[int, ...]], steps: int) -> dict[tuple[int, ...], dict[str, float]]:
    """On one rank: per shape, the median thread CPU time of forward + backward of each variant's norm and act."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = {}
    for shape in shapes:
        torch.manual_seed(0)
        layers = {v: nn.Sequential(*_norm_act(v, shape[1], len(shape))).train() for v in VARIANTS}
        x, dy = torch.randn(shape).requires_grad_(), torch.randn(shape)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(steps):
            for v, layer in layers.items():
                dist.barrier()
                start = time.thread_time()
                (layer(x) * dy).sum().backward()
                times[v].append(time.thread_time() - start)
        out[shape] = {v: statistics.median(t) for v, t in times.items()}
    return out


def print_layer_times(steps: int) -> None:
    import bench_memory
    from distributed import run_on_ranks

    shapes = [(8, 64, 32, 32), (32, 256, 7, 7), (64, 512)]
    reports = run_on_ranks(2, bench_memory.rank_layer_times, shapes, steps)
    base = "syncnorm SyncBatchNorm + LeakyReLU"
    print(f"torch {torch.__version__}, cpu, 2 Gloo ranks x 1 thread, load average {os.getloadavg()[0]:.1f}; one layer, "
          f"forward + backward, thread CPU ms, median of {steps}, slower rank; ratio to {base}")
    print("| shape per rank | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for shape in shapes:
        times = {v: max(r[shape][v] for r in reports) for v in VARIANTS}
        cells = [f"{times[v] * 1e3:.2f} ({times[v] / times[base]:.2f}x)" for v in VARIANTS]
        print(f"| {shape} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="samples per rank")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="height and width")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timm", default="", help="a timm model to measure instead, e.g. efficientnet_b0")
    parser.add_argument("--layer", action="store_true", help="time one norm + activation layer instead")
    parser.add_argument("--world-size", type=int, default=2,
                        help="Gloo ranks (1: one process, no synchronisation; the memory saving is the same)")
    args = parser.parse_args()
    if args.layer:
        print_layer_times(args.steps)
        return
    import bench_memory  # the rank function by its module's name, so that the spawned ranks find it
    from distributed import run_on_ranks

    shape = (args.batch, args.channels, args.size, args.size)
    if args.timm:
        shape = (args.batch, 3, args.size, args.size)
    reports = run_on_ranks(args.world_size, bench_memory.rank_measure, shape, args.steps, args.device, args.timm)
    activation = args.batch * args.channels * args.size * args.size * 4
    what = (f"timm {args.timm} (act_layer='leaky_relu'), input {shape} per rank" if args.timm else
            f"{BLOCKS} blocks conv3x3 -> norm -> LeakyReLU(0.01), input {shape} per rank (one activation "
            f"{activation / 2**20:.2f} MiB)")
    print(f"torch {torch.__version__}, {args.device}, {args.world_size} Gloo rank(s) x 1 thread, "
          f"load average {os.getloadavg()[0]:.1f}; "
          f"{what}")
    variants = list(reports[0])
    base = f"{args.timm} converted" if args.timm else "syncnorm SyncBatchNorm + LeakyReLU"
    baseline = reports[0][base]
    peak = args.device == "cuda"
    print(f"| variant | SyncBatchNormAct layers | saved MiB | saved tensors | vs {base} | "
          + ("peak MiB | " if peak else "") + f"step ms (median) | time vs {base} |")
    print("|---|---|---|---|---|" + ("---|" if peak else "") + "---|---|")
    base_time = statistics.median(max(t) for t in zip(*(r[base]["times"] for r in reports)))
    for v in variants:
        r = reports[0][v]
        step = statistics.median(max(t) for t in zip(*(rep[v]["times"] for rep in reports)))
        cells = [v, str(r["fused"]), f"{r['saved'] / 2**20:.2f}", str(r["tensors"]),
                 f"{r['saved'] / baseline['saved']:.2f}x"]
        if peak:
            cells.append(f"{r['peak'] / 2**20:.1f}")
        cells += [f"{step * 1e3:.1f}", f"{step / base_time:.2f}x"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
