"""GPU layer benchmark: syncnorm vs torch's SyncBatchNorm Function vs cuDNN BatchNorm, one GPU.

Every variant runs forward + backward of one training-mode layer on the same input:
- ``cuDNN BatchNorm``: ``nn.BatchNorm2d``/``1d`` (no synchronisation at all, the bar to reach);
- ``torch fused kernels alone``: ``batch_norm_stats`` + ``batch_norm_elemt`` + ``batch_norm_backward_reduce``
  + ``batch_norm_backward_elemt`` with no communication (the floor of a synchronised layer built on them);
- ``torch SyncBatchNorm Function``: ``torch.nn.modules._functions.SyncBatchNorm.apply`` with a one-rank
  NCCL group (what ``torch.nn.SyncBatchNorm`` runs in training: all_gather + its kernels + all-reduce);
- ``syncnorm``: ``syncnorm._function.SyncBatchNormFunction.apply`` with the same one-rank NCCL group
  (called directly, so it pays its two all-reduces; the module itself would skip them on one rank).

Timing: CUDA events around each fwd+bwd, variants interleaved, median of ``--iters`` after warm-up.
Bandwidth: 8 passes over the activation (forward: read x for statistics, read x + write y;
backward: read dy + x for the sums, read dy + x + write dx) divided by the time, against the card's
peak (2 x memory clock x bus width, from the device properties).

Run (on a machine with a GPU):
    PYTHONPATH=. python benchmarks/bench_gpu.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

from syncnorm._function import SyncBatchNormFunction

CASES: list[tuple[tuple[int, ...], torch.dtype, bool]] = [
    ((64, 256, 56, 56), torch.float32, False),
    ((64, 256, 56, 56), torch.bfloat16, False),
    ((64, 256, 56, 56), torch.bfloat16, True),
    ((256, 512, 7, 7), torch.float32, False),
    ((128, 1024, 14, 14), torch.bfloat16, False),
    ((4096, 2048), torch.float32, False),
]

PASSES = 8


def peak_bandwidth() -> float:
    """Theoretical DRAM bandwidth of the current GPU in bytes/s (double data rate)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return 2.0 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def make_steps(
    x: Tensor, dy: Tensor, group: dist.ProcessGroup
) -> dict[str, Callable[[], None]]:
    """One fwd+bwd callable per variant, each with its own parameters and running statistics."""
    channels = x.shape[1]
    eps, momentum = 1e-5, 0.1

    def params() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = torch.ones(channels, device=x.device, requires_grad=True)
        b = torch.zeros(channels, device=x.device, requires_grad=True)
        return w, b, torch.zeros(channels, device=x.device), torch.ones(channels, device=x.device)

    inp = x.detach().clone().requires_grad_()
    bn = (nn.BatchNorm1d if x.dim() == 2 else nn.BatchNorm2d)(channels).to(x.device)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        bn = bn.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    tw, tb, trm, trv = params()
    sw, sb, srm, srv = params()
    kw = torch.ones(channels, device=x.device)
    count = torch.tensor([x.numel() // channels], dtype=torch.int32, device=x.device)

    def cudnn() -> None:
        inp.grad = None
        bn(inp).backward(dy)

    def kernels_alone() -> None:
        mean, invstd = torch.batch_norm_stats(x, eps)
        torch.batch_norm_elemt(x, kw, kw, mean, invstd, eps)
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(dy, x, mean, invstd, kw, True, True, True)
        torch.batch_norm_backward_elemt(dy, x, mean, invstd, kw, sum_dy, sum_dy_xmu, count)

    def torch_function() -> None:
        inp.grad = None
        TorchSyncBatchNormFunction.apply(inp, tw, tb, trm, trv, eps, momentum, group, 1).backward(dy)

    def ours() -> None:
        inp.grad = None
        SyncBatchNormFunction.apply(inp, sw, sb, srm, srv, eps, momentum, group, "bench").backward(dy)

    return {"cuDNN BatchNorm": cudnn, "torch fused kernels alone": kernels_alone,
            "torch SyncBatchNorm Function (1-rank NCCL)": torch_function, "syncnorm (1-rank NCCL)": ours}


def time_steps(steps: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, float]:
    """Median ms per variant, CUDA events, variants interleaved."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + iters):
        for name, step in steps.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            if i >= warmup:
                times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", 0))
    group = dist.group.WORLD
    peak = peak_bandwidth()
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, peak DRAM bandwidth {peak / 1e12:.2f} TB/s; fwd+bwd per layer, "
          f"CUDA events, median of {args.iters} after {args.warmup} warm-up, variants interleaved; "
          f"bandwidth = {PASSES} passes over the activation / time")
    print("| shape, dtype | variant | ms | vs cuDNN | GB/s (% of peak) |")
    print("|---|---|---|---|---|")
    for shape, dtype, channels_last in CASES:
        torch.manual_seed(0)
        x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype)
        dy = torch.randn(shape, device="cuda").to(dtype)
        if channels_last:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        steps = make_steps(x, dy, group)
        medians = time_steps(steps, args.warmup, args.iters)
        label = f"{tuple(shape)} {str(dtype).replace('torch.', '')}{' channels_last' if channels_last else ''}"
        traffic = PASSES * x.numel() * x.element_size()
        for variant, ms in medians.items():
            rate = traffic / (ms * 1e-3)
            print(f"| {label} | {variant} | {ms:.3f} | {ms / medians['cuDNN BatchNorm']:.2f}x "
                  f"| {rate / 1e9:.0f} ({100 * rate / peak:.0f}%) |")
        del x, dy, steps
        torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    main()
