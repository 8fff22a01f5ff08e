"""The cases, the timing and the watchdog of ``python -m syncnorm.selftest`` (public API only)."""

from __future__ import annotations

import copy
import faulthandler
import os
import pickle
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import syncnorm

# Tolerances of the input dtype (as the test suite's): outputs and gradients here are O(1).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # (rtol, atol)
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
}


@dataclass
class Context:
    """Where this rank runs."""

    device: torch.device
    rank: int
    world_size: int
    backend: str
    quick: bool


@dataclass
class Case:
    """One exactness case: per-rank batch sizes from the world size (None: not applicable, with why)."""

    name: str
    tail: tuple[int, ...]  # (C, ...) of the input
    sizes: Callable[[int], Optional[list[int]]]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    model: bool = False
    skip_reason: str = ""


@dataclass
class Result:
    """What one case found, identical on every rank (computed from gathered data)."""

    name: str
    shapes: str
    dtype: str
    max_error: Optional[float]
    tolerance: str
    ratio: Optional[float]
    verdict: str  # PASS, FAIL or "skipped: why"
    worst: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """For --json."""
        return asdict(self)


CASES = [
    Case("2-D (N, C)", (16,), lambda w: [8] * w),
    Case("4-D (N, C, H, W)", (8, 5, 5), lambda w: [4] * w),
    Case("uneven batches", (8, 4, 4), lambda w: [2 + 3 * r for r in range(w)]),
    Case("one rank empty", (8, 4, 4), lambda w: [0] + [3 + r for r in range(w - 1)] if w >= 2 else None,
         skip_reason="needs a world size of 2 or more"),
    Case("channels_last", (8, 4, 4), lambda w: [3 + r for r in range(w)], channels_last=True),
    Case("float16", (8, 4, 4), lambda w: [4] * w, dtype=torch.float16),
    Case("bfloat16", (8, 4, 4), lambda w: [4] * w, dtype=torch.bfloat16),
    Case("DDP step, converted conv net", (3, 6, 6), lambda w: [3 + r for r in range(w)], model=True),
]


def gather_objects(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective).

    Not ``dist.all_gather_object``: it needs numpy, which torch does not install.
    """
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    world_size = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = max(int(size.item()) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [pickle.loads(bytes(t[: int(n.item())].tolist())) for t, n in zip(gathered, sizes)]


def _cpu(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to("cpu", torch.float64)


class _Errors:
    """The largest error, and error/allowed, over many comparisons."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.rtol, self.atol = TOLERANCES[dtype]
        self.max_error = 0.0
        self.ratio = 0.0
        self.worst = ""

    def add(self, what: str, ours: Optional[Tensor], ref: Optional[Tensor]) -> None:
        if ours is None or ref is None:
            if (ours is None) != (ref is None):
                self.ratio, self.worst = float("inf"), f"{what} missing"
            return
        if ours.shape != ref.shape:
            self.ratio, self.worst = float("inf"), f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
            return
        if ours.numel() == 0:
            return
        diff = (ours.double() - ref.double()).abs()
        ratio = (diff / (self.atol + self.rtol * ref.double().abs())).max().item()
        ratio = float("inf") if ratio != ratio else ratio  # NaN
        self.max_error = max(self.max_error, diff.max().item())
        if ratio > self.ratio:
            self.ratio, self.worst = ratio, what

    def result(self, case: Case, sizes: list[int], notes: list[str]) -> Result:
        shapes = ", ".join(str(n) for n in sizes) + " x " + "x".join(map(str, case.tail))
        failed = self.ratio > 1.0 or bool(notes)
        return Result(case.name, shapes, str(case.dtype).replace("torch.", ""), self.max_error,
                      f"rtol {self.rtol:g}, atol {self.atol:g}", self.ratio, "FAIL" if failed else "PASS",
                      self.worst if self.ratio > 1.0 else "", notes)


def _inputs(case: Case, n: int, ctx: Context, seed: int) -> tuple[Tensor, Tensor]:
    """This rank's input and upstream gradient, rounded to the case's dtype."""
    generator = torch.Generator().manual_seed(seed + 1000 * ctx.rank)
    shape = (n, *case.tail)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3
    dy = torch.randn(shape if not case.model else (n, 4), generator=generator, dtype=torch.float64)
    return x.to(case.dtype).to(ctx.device), dy.to(case.dtype).to(ctx.device)


def _reference_bn(dim: int, channels: int) -> nn.modules.batchnorm._BatchNorm:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim]
    return cls(channels, dtype=torch.float64)


def _set_params(bn: nn.modules.batchnorm._BatchNorm, channels: int) -> None:
    with torch.no_grad():
        bn.weight.copy_(1 + 0.1 * torch.arange(channels))
        bn.bias.copy_(0.1 * torch.arange(channels) - 0.2)


def run_layer_case(case: Case, ctx: Context, sizes: list[int]) -> Result:
    """One training step of one SyncBatchNorm on every rank, against float64 BatchNorm on the whole batch."""
    channels = case.tail[0]
    x, dy = _inputs(case, sizes[ctx.rank], ctx, seed=len(case.name))
    if case.channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    layer = syncnorm.SyncBatchNorm(channels, device=ctx.device)
    _set_params(layer, channels)
    y = layer(x)
    y.backward(dy)
    assert layer.weight.grad is not None and layer.bias.grad is not None and layer.num_batches_tracked is not None
    kept = not case.channels_last or (y.is_contiguous(memory_format=torch.channels_last)
                                      and x.grad is not None
                                      and x.grad.is_contiguous(memory_format=torch.channels_last))
    mine = {"x": _cpu(x), "dy": _cpu(dy), "y": _cpu(y), "grad_x": _cpu(x.grad), "grad_weight": _cpu(layer.weight.grad),
            "grad_bias": _cpu(layer.bias.grad), "running_mean": _cpu(layer.running_mean),
            "running_var": _cpu(layer.running_var), "num_batches_tracked": int(layer.num_batches_tracked.item()),
            "layout_kept": kept, "dtype": str(y.dtype)}
    ranks = gather_objects(mine, ctx.device)

    ref = _reference_bn(len(case.tail) + 1, channels)
    _set_params(ref, channels)
    x64 = torch.cat([r["x"] for r in ranks]).requires_grad_()
    y64 = ref(x64)
    y64.backward(torch.cat([r["dy"] for r in ranks]))
    errors = _Errors(case.dtype)
    errors.add("output", torch.cat([r["y"] for r in ranks]), y64.detach())
    errors.add("grad_input", torch.cat([r["grad_x"] for r in ranks]), x64.grad)
    errors.add("grad_weight (sum over ranks)", sum(r["grad_weight"] for r in ranks), ref.weight.grad)
    errors.add("grad_bias (sum over ranks)", sum(r["grad_bias"] for r in ranks), ref.bias.grad)
    notes = []
    assert ref.num_batches_tracked is not None
    expected_batches = int(ref.num_batches_tracked.item())
    for rank, r in enumerate(ranks):
        errors.add(f"running_mean on rank {rank}", r["running_mean"], ref.running_mean)
        errors.add(f"running_var on rank {rank}", r["running_var"], ref.running_var)
        if r["num_batches_tracked"] != expected_batches:
            notes.append(f"num_batches_tracked {r['num_batches_tracked']} on rank {rank}, expected {expected_batches}")
        if not r["layout_kept"]:
            notes.append(f"rank {rank}: output or input gradient lost channels_last")
        if r["dtype"] != str(case.dtype):
            notes.append(f"rank {rank}: output dtype {r['dtype']}, expected {case.dtype}")
    return errors.result(case, sizes, notes)


def small_conv_net() -> nn.Module:
    """Two conv-BN-ReLU stages and a linear head with BatchNorm1d (three BatchNorm layers)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
    )


def run_model_case(case: Case, ctx: Context, sizes: list[int]) -> Result:
    """One DDP step of the converted net on every rank vs the original net in float64 on the whole batch."""
    torch.manual_seed(0)  # the same initial model on every rank (DDP would broadcast rank 0's anyway)
    model = small_conv_net()
    reference = copy.deepcopy(model).double()
    model = syncnorm.convert_model(model).to(ctx.device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                              else None)
    x, dy = _inputs(case, sizes[ctx.rank], ctx, seed=7)
    total = sum(sizes)
    # DDP averages gradients over ranks: scaled by W / N, the average is the gradient of the global mean.
    loss = (ddp(x) * dy).sum() * (ctx.world_size / total)
    loss.backward()
    mine = {"x": _cpu(x), "dy": _cpu(dy), "loss": loss.item(),
            "grads": {n: _cpu(p.grad) for n, p in model.named_parameters()},
            "buffers": {n: _cpu(b) if b.is_floating_point() else int(b.item()) for n, b in model.named_buffers()}}
    ranks = gather_objects(mine, ctx.device)

    x64 = torch.cat([r["x"] for r in ranks])
    ref_loss = (reference(x64) * torch.cat([r["dy"] for r in ranks])).sum() / total
    ref_loss.backward()
    errors = _Errors(torch.float32)
    errors.add("loss", torch.tensor(sum(r["loss"] for r in ranks) / ctx.world_size), ref_loss.detach())
    notes = []
    for rank, r in enumerate(ranks):
        for name, p in reference.named_parameters():
            errors.add(f"{name}.grad on rank {rank}", r["grads"][name], p.grad)
        for name, b in reference.named_buffers():
            if b.is_floating_point():
                errors.add(f"{name} on rank {rank}", r["buffers"][name], b)
            elif r["buffers"][name] != int(b.item()):
                notes.append(f"{name} {r['buffers'][name]} on rank {rank}, expected {int(b.item())}")
    return errors.result(case, sizes, notes)


def run_case(case: Case, ctx: Context) -> Result:
    """Run one case on every rank (every rank takes the same branches: they depend on the world size only)."""
    sizes = case.sizes(ctx.world_size)
    dtype = str(case.dtype).replace("torch.", "")
    if sizes is None:
        return Result(case.name, "-", dtype, None, "-", None, f"skipped: {case.skip_reason}")
    if not case.model:
        return run_layer_case(case, ctx, sizes)
    # TF32 convolutions and matmuls (on by default for cuDNN convolutions) are not float32-exact.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return run_model_case(case, ctx, sizes)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --- speed -------------------------------------------------------------------------------------------------

SPEED_SHAPES = {
    "cpu": [((16, 64, 32, 32), torch.float32), ((32, 256, 8, 8), torch.float32), ((512, 1024), torch.float32)],
    "cpu-quick": [((8, 32, 16, 16), torch.float32), ((256, 256), torch.float32)],
    "cuda": [((64, 256, 56, 56), torch.float32), ((64, 256, 56, 56), torch.bfloat16),
             ((256, 512, 7, 7), torch.float32), ((128, 1024, 14, 14), torch.bfloat16), ((4096, 2048), torch.float32)],
    "cuda-quick": [((64, 256, 56, 56), torch.bfloat16), ((256, 512, 7, 7), torch.float32),
                   ((4096, 2048), torch.float32)],
}
# The same syncnorm layer in a process group of this rank alone: its own work, without communication. The
# difference to "syncnorm" is the all-reduces and each rank's wait in them for the slowest rank.
WITHOUT_COMMUNICATION = "syncnorm without communication"
VARIANTS = ("syncnorm", WITHOUT_COMMUNICATION, "local BatchNorm", "torch.nn.SyncBatchNorm")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layers(channels: int, dim: int, device: torch.device, alone: Any) -> dict[str, nn.Module]:
    local = (nn.BatchNorm1d if dim <= 3 else nn.BatchNorm2d)(channels, device=device)
    return {"syncnorm": syncnorm.SyncBatchNorm(channels, device=device),
            WITHOUT_COMMUNICATION: syncnorm.SyncBatchNorm(channels, process_group=alone, device=device),
            "local BatchNorm": local, "torch.nn.SyncBatchNorm": nn.SyncBatchNorm(channels, device=device)}


def run_speed(ctx: Context, iters: Optional[int]) -> tuple[list[dict[str, Any]], str]:
    """Median fwd+bwd ms per variant and shape, the slowest rank's (all-reduced MAX)."""
    key = ("cuda" if ctx.device.type == "cuda" else "cpu") + ("-quick" if ctx.quick else "")
    iters = iters or (8 if ctx.quick else 30)
    warmup = 2 if ctx.quick else 5
    rows = []
    # Every rank creates every group, in the same order, as new_group requires.
    alone = [dist.new_group([rank]) for rank in range(ctx.world_size)][ctx.rank]
    for shape, dtype in SPEED_SHAPES[key]:
        torch.manual_seed(ctx.rank)
        x = (torch.randn(shape, device=ctx.device) * 2 + 3).to(dtype).requires_grad_()
        dy = torch.randn(shape, device=ctx.device).to(dtype)
        layers = _layers(shape[1], len(shape), ctx.device, alone)
        notes: dict[str, str] = {}
        for name in list(layers):
            try:  # the same on every rank: it depends on the device type only
                layers[name](x).backward(dy)
            except (ValueError, RuntimeError) as error:
                notes[name] = f"{name} refuses {ctx.device.type} tensors: {str(error).splitlines()[0]}"
                del layers[name]
        times: dict[str, list[float]] = {name: [] for name in layers}
        for i in range(warmup + iters):
            dist.barrier()  # every rank starts the step together; not timed
            for name, layer in layers.items():
                x.grad = None
                _sync(ctx.device)
                start = time.perf_counter()
                layer(x).backward(dy)
                _sync(ctx.device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
        medians = torch.tensor([statistics.median(times[v]) if v in times else 0.0 for v in VARIANTS],
                               dtype=torch.float64, device=ctx.device)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX)
        median = dict(zip(VARIANTS, medians.tolist()))
        ms = {v: f"{m:.3f}" for v, m in median.items() if v in layers}
        synced, local = median["syncnorm"], median["local BatchNorm"]
        ratio = f"{synced / local:.2f}x" if local > 0 else "-"
        # The part of syncnorm's time that is communication (0 on one rank, where neither layer communicates).
        share = max(0.0, 1 - median[WITHOUT_COMMUNICATION] / synced) if synced > 0 else 0.0
        rows.append({"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                     "variants": list(VARIANTS), "ms": ms, "notes": {k: "refused" for k in notes}, "ratio": ratio,
                     "reasons": notes, "communication_share": round(share, 3)})
        del x, dy, layers
    note = (f"median of {iters} steps after {warmup} warm-up, slowest of {ctx.world_size} rank(s), "
            f"{ctx.backend}, {ctx.device.type}")
    if ctx.world_size == 1:
        note += "; one rank: neither synchronised layer communicates"
    return rows, note


# --- watchdog ----------------------------------------------------------------------------------------------


class Watchdog:
    """Ends this process with a message when the armed step runs past its deadline (never a silent hang)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadline: Optional[float] = None
        self._what = ""
        self._seconds = 0.0
        threading.Thread(target=self._watch, name="syncnorm-selftest-watchdog", daemon=True).start()

    def arm(self, seconds: float, what: str) -> None:
        """From now, ``what`` has ``seconds`` to finish."""
        with self._lock:
            self._deadline, self._what, self._seconds = time.monotonic() + seconds, what, seconds

    def disarm(self) -> None:
        """Nothing is watched."""
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what, seconds = self._what, self._seconds
            if late:
                rank = os.environ.get("RANK", "0")
                print(f"syncnorm.selftest rank {rank}: {what} did not finish within {seconds:.0f} s: a rank died, "
                      "hangs or was never started (raise --timeout if the job is only slow). Stacks:",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(1)
