"""GPU benchmarks on one GPU: per layer (syncnorm vs torch's SyncBatchNorm Function vs cuDNN BatchNorm), and a
ResNet-50 training step (eager and CUDA-graphed) with syncnorm vs torch.nn.SyncBatchNorm vs local BatchNorm.

Part ``layer`` (``--part layer``):

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

Part ``model`` (``--part model``): one training step (forward, cross-entropy, backward, SGD with
momentum) of torchvision's ``resnet50`` (random weights, 53 BatchNorm layers), channels_last, bf16 autocast,
``--model-batch`` images of 224x224, with its BatchNorms as: local ``nn.BatchNorm2d`` (cuDNN); syncnorm
(``convert_model``) forced to synchronise over the 1-rank NCCL group (both all-reduces issued per layer, as
on W ranks); torch.nn.SyncBatchNorm's Function over the same group (what its module runs on W > 1 ranks).
Each eagerly, and as one CUDA graph of the whole step (``torch.cuda.graph``, captured after warm-up on a
side stream); median ms per step, CUDA events.

Run (on a machine with a GPU):
    PYTHONPATH=. python benchmarks/bench_gpu.py [--part all|layer|model] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

import syncnorm
from syncnorm import _comm
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


class TorchSyncBatchNorm2d(nn.BatchNorm2d):
    """torch.nn.SyncBatchNorm's training forward as it runs on W > 1 ranks, forced onto a 1-rank group."""

    def __init__(self, bn: nn.BatchNorm2d, group: dist.ProcessGroup) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, device=bn.weight.device)
        self.load_state_dict(bn.state_dict())
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        assert self.num_batches_tracked is not None and self.momentum is not None
        self.num_batches_tracked.add_(1)
        out: Tensor = TorchSyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean,
                                                       self.running_var, self.eps, self.momentum, self.group, 1)
        return out


def _replace_bn(module: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, TorchSyncBatchNorm2d(child, group))
        else:
            _replace_bn(child, group)
    return module


def _model_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, target: Tensor) -> None:
    optimizer.zero_grad(set_to_none=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()


def _time_model(model: nn.Module, batch: int, warmup: int, iters: int, graphed: bool) -> float:
    """Median ms of a training step, eager or replayed from one CUDA graph."""
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            _model_step(model, optimizer, x, target)
    torch.cuda.current_stream().wait_stream(side)
    step: Callable[[], None] = lambda: _model_step(model, optimizer, x, target)  # noqa: E731
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _model_step(model, optimizer, x, target)
        step = graph.replay
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_model(group: dist.ProcessGroup, batch: int, warmup: int, iters: int) -> list[dict[str, object]]:
    """The ResNet-50 step table: variant x (eager, graphed)."""
    import torchvision

    def build(kind: str) -> nn.Module:
        torch.manual_seed(0)
        model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if kind == "syncnorm (1-rank NCCL, synchronising)":
            return syncnorm.convert_model(model)
        if kind == "torch SyncBatchNorm Function (1-rank NCCL)":
            return _replace_bn(model, group)
        return model

    # syncnorm skips communication in a group of one rank: make every layer synchronise over it anyway.
    original = _comm.statistics_group
    _comm.statistics_group = lambda process_group, layer: group  # type: ignore[assignment]
    rows: list[dict[str, object]] = []
    print(f"\nResNet-50 training step, batch {batch}x3x224x224 channels_last, bf16 autocast, SGD; "
          f"median of {iters} after {warmup} warm-up, CUDA events")
    print("| BatchNorm | eager ms | CUDA-graphed ms | graphed / eager | eager vs local |")
    print("|---|---|---|---|---|")
    try:
        local_eager = None
        for kind in ("local BatchNorm (cuDNN)", "syncnorm (1-rank NCCL, synchronising)",
                     "torch SyncBatchNorm Function (1-rank NCCL)"):
            result: dict[str, object] = {"variant": kind}
            for graphed in (False, True):
                try:
                    result["graphed" if graphed else "eager"] = _time_model(build(kind), batch, warmup, iters,
                                                                            graphed)
                except Exception as error:  # noqa: BLE001 - a variant that cannot be captured is a result
                    result["graphed" if graphed else "eager"] = None
                    result["error " + ("graphed" if graphed else "eager")] = f"{type(error).__name__}: {error}"
                    torch.cuda.synchronize()
                torch.cuda.empty_cache()
            eager, graphed_ms = result["eager"], result["graphed"]
            if kind.startswith("local"):
                local_eager = eager

            def fmt(v: object) -> str:
                return f"{v:.2f}" if isinstance(v, float) else "failed"

            ratio = f"{graphed_ms / eager:.2f}x" if isinstance(eager, float) and isinstance(graphed_ms, float) else "-"
            vs = f"{eager / local_eager:.2f}x" if isinstance(eager, float) and isinstance(local_eager, float) else "-"
            print(f"| {kind} | {fmt(eager)} | {fmt(graphed_ms)} | {ratio} | {vs} |")
            rows.append(result)
    finally:
        _comm.statistics_group = original  # type: ignore[assignment]
    for r in rows:
        for key, value in r.items():
            if key.startswith("error"):
                print(f"- {r['variant']}, {key[6:]}: {str(value).splitlines()[0][:300]}")
    return rows


def run_layers(group: dist.ProcessGroup, warmup: int, iters: int) -> list[dict[str, object]]:
    """The per-layer table."""
    peak = peak_bandwidth()
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, peak DRAM bandwidth {peak / 1e12:.2f} TB/s; fwd+bwd per layer, "
          f"CUDA events, median of {iters} after {warmup} warm-up, variants interleaved; "
          f"bandwidth = {PASSES} passes over the activation / time")
    print("| shape, dtype | variant | ms | vs cuDNN | GB/s (% of peak) |")
    print("|---|---|---|---|---|")
    rows: list[dict[str, object]] = []
    for shape, dtype, channels_last in CASES:
        torch.manual_seed(0)
        x = (torch.randn(shape, device="cuda") * 2 + 3).to(dtype)
        dy = torch.randn(shape, device="cuda").to(dtype)
        if channels_last:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        steps = make_steps(x, dy, group)
        medians = time_steps(steps, warmup, iters)
        label = f"{tuple(shape)} {str(dtype).replace('torch.', '')}{' channels_last' if channels_last else ''}"
        traffic = PASSES * x.numel() * x.element_size()
        for variant, ms in medians.items():
            rate = traffic / (ms * 1e-3)
            print(f"| {label} | {variant} | {ms:.3f} | {ms / medians['cuDNN BatchNorm']:.2f}x "
                  f"| {rate / 1e9:.0f} ({100 * rate / peak:.0f}%) |")
            rows.append({"case": label, "variant": variant, "ms": ms, "GB/s": rate / 1e9, "peak GB/s": peak / 1e9})
        del x, dy, steps
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "layer", "model"), default="all")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model-batch", type=int, default=32, help="images per step of the ResNet-50 part")
    parser.add_argument("--model-iters", type=int, default=20)
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (torch sees none); run it on a machine with a GPU.")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", 0))
    group = dist.group.WORLD
    assert group is not None
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.part in ("all", "layer"):
        results["layer"] = run_layers(group, args.warmup, args.iters)
    if args.part in ("all", "model"):
        results["model"] = run_model(group, args.model_batch, 3, args.model_iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    main()
