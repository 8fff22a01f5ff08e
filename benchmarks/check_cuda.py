"""Correctness of syncnorm's CUDA path on one GPU, against the float64 reference (run by gpu.sh).

NCCL refuses two ranks on one GPU, so this drives the autograd Function directly with a one-rank
NCCL group: it takes the fused CUDA kernels and both all-reduces exactly as on W ranks, and its
results must equal float64 ``torch.nn.functional.batch_norm`` on the same batch (output, input
gradient, weight/bias gradients, running statistics), to the tolerance of the input dtype. Also
checks that mean 1e4 / std 1e-2 float32 data is as exact as torch's own single-GPU BatchNorm.
Exits non-zero on the first mismatch.

Run (on a machine with a GPU):
    PYTHONPATH=. python benchmarks/check_cuda.py
"""

from __future__ import annotations

import argparse
import datetime
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from syncnorm._function import SyncBatchNormFunction
from tests.reference import TOLERANCES

CASES: list[tuple[tuple[int, ...], torch.dtype, str]] = [
    ((16, 8), torch.float32, "contiguous"),
    ((6, 5, 7), torch.float32, "contiguous"),
    ((4, 8, 6, 6), torch.float32, "contiguous"),
    ((4, 8, 6, 6), torch.float32, "channels_last"),
    ((2, 4, 3, 5, 5), torch.float32, "channels_last_3d"),
    ((4, 8, 6, 6), torch.float16, "contiguous"),
    ((4, 8, 6, 6), torch.bfloat16, "channels_last"),
    ((4, 8, 6, 6), torch.float64, "contiguous"),
]


def _layout(t: Tensor, layout: str) -> Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.contiguous()


def check_case(shape: tuple[int, ...], dtype: torch.dtype, layout: str, group: dist.ProcessGroup) -> None:
    generator = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 2
    dy = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    xc = _layout(x.to(dtype).cuda(), layout).requires_grad_()
    w = weight.to(param_dtype).cuda().requires_grad_()
    b = bias.to(param_dtype).cuda().requires_grad_()
    rm, rv = torch.zeros(channels, device="cuda", dtype=param_dtype), torch.ones(channels, device="cuda",
                                                                                   dtype=param_dtype)
    y = SyncBatchNormFunction.apply(xc, w, b, rm, rv, 1e-5, 0.1, group, "check")
    y.backward(_layout(dy.to(dtype).cuda(), layout))

    x64 = x.to(dtype).double().requires_grad_()  # the same (rounded) input values, in float64
    w64, b64 = weight.to(param_dtype).double().requires_grad_(), bias.to(param_dtype).double().requires_grad_()
    rm64, rv64 = torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)
    y64 = F.batch_norm(x64, rm64, rv64, w64, b64, True, 0.1, 1e-5)
    y64.backward(dy.to(dtype).double())

    tol = TOLERANCES[dtype]
    what = f"{shape} {dtype} {layout}"
    assert y.dtype == dtype, f"{what}: output dtype {y.dtype}"
    if layout != "contiguous":
        fmt = torch.channels_last if layout == "channels_last" else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt), f"{what}: output lost {layout}"
        assert xc.grad is not None and xc.grad.is_contiguous(memory_format=fmt), f"{what}: grad lost {layout}"
    for name, ours, ref in (("y", y, y64), ("grad_x", xc.grad, x64.grad), ("grad_weight", w.grad, w64.grad),
                            ("grad_bias", b.grad, b64.grad), ("running_mean", rm, rm64), ("running_var", rv, rv64)):
        assert ours is not None and ref is not None, f"{what}: {name} missing"
        torch.testing.assert_close(ours.detach().cpu().double(), ref.detach(), **tol,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")
    print(f"ok  {what}")


def check_large_mean(group: dist.ProcessGroup) -> None:
    """mean 1e4, std 1e-2 float32: syncnorm's error no larger than torch's own cuDNN BatchNorm's."""
    generator = torch.Generator().manual_seed(3)
    x = (1e4 + 1e-2 * torch.randn(16, 3, 6, 6, generator=generator, dtype=torch.float64)).float()
    dy = torch.randn(x.shape, generator=generator)
    x64 = x.double().requires_grad_()
    y64 = F.batch_norm(x64, None, None, None, None, True, 0.1, 1e-5)
    y64.backward(dy.double())

    def error(fn: object) -> tuple[float, float]:
        xc = x.cuda().requires_grad_()
        y = fn(xc)  # type: ignore[operator]
        y.backward(dy.cuda())
        assert x64.grad is not None and xc.grad is not None
        return ((y.detach().cpu().double() - y64.detach()).abs().max().item(),
                (xc.grad.cpu().double() - x64.grad).abs().max().item())

    ours = error(lambda t: SyncBatchNormFunction.apply(t, None, None, None, None, 1e-5, 0.1, group, "check"))
    theirs = error(lambda t: F.batch_norm(t, None, None, None, None, True, 0.1, 1e-5))
    for name, o, t in zip(("y", "grad_x"), ours, theirs):
        assert o <= 1.25 * t + 1e-6, f"mean 1e4 std 1e-2 {name}: syncnorm error {o:.3g} > torch's {t:.3g}"
    print(f"ok  mean 1e4 / std 1e-2 float32: errors (y, grad_x) syncnorm {ours}, torch {theirs}")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("check_cuda.py needs a CUDA device (torch sees none); run it on a machine with a GPU.")
    torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", 0))
    group = dist.group.WORLD
    for shape, dtype, layout in CASES:
        check_case(shape, dtype, layout, group)
    check_large_mean(group)
    dist.destroy_process_group()
    print("CUDA path: all checks passed")


if __name__ == "__main__":
    main()
