"""Prototypes of the overlap options of shared/DESIGN-NOTES.md section 5, for bench_layer.py --overlap.

Each is syncnorm's autograd Function (same _stats/_kernels pieces, same numerics) with one change:
- ``AsyncBackward``: the backward all-reduce is issued with ``async_op=True`` and the part of the
  input gradient that needs no global sum (``dy * weight * invstd``) is computed before ``wait()``;
  the rest is added afterwards (one extra pass over the activation, the price of the overlap).
- ``PipelinedForward``: the channels are split into ``groups``; the statistics all-reduce of group i
  is in flight (``async_op=True``) while the local statistics of group i+1 are computed. It costs
  ``groups`` all-reduces per forward instead of one.
They live here, not in syncnorm, until a measurement shows they pay (docs/performance.md).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from syncnorm import _kernels, _stats


def _finish_forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Tensor, running_var: Tensor, eps: float, momentum: float,
                    total: _stats.GlobalMoments, output: Optional[Tensor] = None) -> Tensor:
    dtype = _stats.statistics_dtype(x)
    mean, var = total.mean.to(dtype), total.var.to(dtype)
    invstd = total.var.add(eps).rsqrt_().to(dtype)
    with torch.no_grad():
        running_mean.copy_(running_mean.double().lerp_(total.mean, momentum))
        running_var.copy_(running_var.double().lerp_(_stats.unbiased_var(total), momentum))
    ctx.save_for_backward(x, weight, mean, var, invstd)
    ctx.count, ctx.eps = total.num_values, eps
    return _kernels.normalize(x, weight, bias, mean, var, invstd, eps, out=output)


def _sync_backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
    x, weight, mean, var, invstd = ctx.saved_tensors
    dy = _kernels.like_layout(dy, x)
    sums = _kernels.backward_reduce(dy, x, mean, var, invstd, ctx.eps, weight, True, True)
    buf = torch.cat([sums.sum_dy, sums.sum_dy_xmu])
    dist.all_reduce(buf)
    sum_dy, sum_dy_xmu = buf.chunk(2)
    grad_x = _kernels.backward_elemt(dy, x, mean, var, invstd, ctx.eps, weight, sum_dy, sum_dy_xmu, ctx.count)
    return grad_x, sums.grad_weight, sums.grad_bias, None, None, None, None, None


class AsyncBackward(torch.autograd.Function):
    """syncnorm with the backward all-reduce overlapped by the dy * weight * invstd pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,  # type: ignore[override]
                running_var: Tensor, eps: float, momentum: float, groups: int) -> Tensor:
        x = _kernels.keep_layout(x)
        output = torch.empty_like(x)  # holds the deviations, then the output, as in syncnorm
        packed = _stats.pack_moments(_stats.local_moments(x, scratch=output))
        dist.all_reduce(packed)
        return _finish_forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum,
                               _stats.unpack_moments(packed), output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        x, weight, mean, var, invstd = ctx.saved_tensors
        dy = _kernels.like_layout(grad_output, x)
        sums = _kernels.backward_reduce(dy, x, mean, var, invstd, ctx.eps, weight, True, True)
        buf = torch.cat([sums.sum_dy, sums.sum_dy_xmu])
        work = dist.all_reduce(buf, async_op=True)
        scale = weight * invstd
        view = (1, -1, *([1] * (x.dim() - 2)))
        grad_x = dy * scale.view(view)  # needs no global sum: overlaps the all-reduce
        work.wait()
        sum_dy, sum_dy_xmu = buf.double().chunk(2)
        count = ctx.count.double()
        k = -scale.double() * invstd.double() * (sum_dy_xmu / count)
        c = -scale.double() * (sum_dy / count)
        grad_x.add_(torch.batch_norm(x, k.to(mean.dtype), c.to(mean.dtype), mean, var, False, 0.0, ctx.eps, False))
        return grad_x, sums.grad_weight, sums.grad_bias, None, None, None, None, None


class PipelinedForward(torch.autograd.Function):
    """syncnorm whose forward all-reduces channel groups as soon as their statistics are ready."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,  # type: ignore[override]
                running_var: Tensor, eps: float, momentum: float, groups: int) -> Tensor:
        x = _kernels.keep_layout(x)
        bounds = torch.linspace(0, x.shape[1], groups + 1).long().tolist()
        packs, works = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            packed = _stats.pack_moments(_stats.local_moments(x[:, lo:hi]))
            works.append(dist.all_reduce(packed, async_op=True))
            packs.append(packed)
        for work in works:
            work.wait()
        sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
        merged = torch.cat([packs[0][:1]] + [p[1:1 + n] for p, n in zip(packs, sizes)]
                           + [p[1 + n:] for p, n in zip(packs, sizes)])
        return _finish_forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum,
                               _stats.unpack_moments(merged))

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        return _sync_backward(ctx, grad_output)


class OverlapBatchNorm(nn.BatchNorm2d):
    """A BatchNorm layer running one of the prototype Functions above (training mode only)."""

    def __init__(self, channels: int, function: Any, groups: int = 1) -> None:
        super().__init__(channels)
        self.function, self.groups = function, groups

    def forward(self, x: Tensor) -> Tensor:
        return self.function.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                   self.momentum, self.groups)
