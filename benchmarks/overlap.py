"""Prototypes of two ways to overlap communication with compute, for bench_layer.py --overlap.

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

from syncnorm import _backends, _function, _kernels, _stats

_NATIVE = _backends.NATIVE


def _finish_forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Tensor, running_var: Tensor, eps: float, momentum: float,
                    summed: Tensor, local: _stats.LocalMoments) -> Tensor:
    stats = _backends.finish_statistics(_NATIVE, summed, local, None, weight, bias, eps, _stats.statistics_dtype(x),
                                        running_mean, running_var, momentum)
    saved = _function.saved_for_backward(x, stats, local, weight)
    ctx.save_for_backward(x, *saved)
    return _NATIVE.normalize(x, local, stats, weight)


def _saved(ctx: Any) -> tuple[Tensor, _backends.Saved]:
    x, *saved = ctx.saved_tensors
    return x, _backends.Saved(*saved)


def _sums(dy: Tensor, x: Tensor, saved: _backends.Saved) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient-sum buffer (folded as in ``_function.backward_gradients``), this rank's weight and bias grads."""
    sum_dy, sum_dy_xmu = _NATIVE.backward_reduce(dy, x, saved)
    buf = torch.empty(2, sum_dy.numel(), dtype=sum_dy.dtype)
    torch.addcmul(sum_dy_xmu, saved.residual, sum_dy, value=-1, out=buf[1])
    grad_weight = buf[1] * saved.invstd
    torch.addcmul(sum_dy, saved.r_invstd2, buf[1], value=-1, out=buf[0])
    return buf, grad_weight, sum_dy


def _sync_backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
    x, saved = _saved(ctx)
    dy = _kernels.like_layout(dy, x)
    buf, grad_weight, grad_bias = _sums(dy, x, saved)
    dist.all_reduce(buf)
    grad_x = _NATIVE.backward_elemt(dy, x, saved, buf)
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


class AsyncBackward(torch.autograd.Function):
    """syncnorm with the backward all-reduce overlapped by the dy * weight * invstd pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,  # type: ignore[override]
                running_var: Tensor, eps: float, momentum: float, groups: int) -> Tensor:
        x = _kernels.keep_layout(x)
        output = torch.empty_like(x)  # holds the deviations, then the output, as in syncnorm
        local = _stats.local_moments(x, scratch=output)
        packed = _stats.pack_moments(local)
        dist.all_reduce(packed)
        return _finish_forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, packed, local)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        x, saved = _saved(ctx)
        dy = _kernels.like_layout(grad_output, x)
        buf, grad_weight, grad_bias = _sums(dy, x, saved)
        work = dist.all_reduce(buf, async_op=True)
        grad_x = dy * _kernels.per_channel(saved.alpha, x)  # needs no global sum: overlaps the all-reduce
        work.wait()
        assert saved.coef is not None
        c, k = buf * saved.coef
        rest = torch.sub(x, _kernels.per_channel(saved.mean, x))
        torch.addcmul(_kernels.per_channel(c, x), rest, _kernels.per_channel(k, x), out=rest)
        return grad_x.add_(rest), grad_weight, grad_bias, None, None, None, None, None


class PipelinedForward(torch.autograd.Function):
    """syncnorm whose forward all-reduces channel groups as soon as their statistics are ready.

    The per-group deviations are not kept (slices of the output buffer are not dense), so the
    normalisation takes one more pass over the activation than syncnorm's.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,  # type: ignore[override]
                running_var: Tensor, eps: float, momentum: float, groups: int) -> Tensor:
        x = _kernels.keep_layout(x)
        bounds = torch.linspace(0, x.shape[1], groups + 1).long().tolist()
        packs, works, shifts = [], [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            local = _stats.local_moments(x[:, lo:hi])
            shifts.append(local.shift)
            packed = _stats.pack_moments(local)
            works.append(dist.all_reduce(packed, async_op=True))
            packs.append(packed)
        for work in works:
            work.wait()
        sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
        merged = torch.cat([packs[0][:1]] + [p[1:1 + n] for p, n in zip(packs, sizes)]
                           + [p[1 + n:] for p, n in zip(packs, sizes)])
        shift = torch.cat(shifts)
        deviations = torch.sub(x.to(shift.dtype), _kernels.per_channel(shift, x))
        local = _stats.LocalMoments(_stats.values_per_channel(x), shift, shift, shift, deviations)
        return _finish_forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, merged, local)

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
