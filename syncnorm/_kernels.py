"""Per-element work of the synchronised layer, on the fastest kernel each device has.

CUDA: torch's fused SyncBatchNorm pieces (``batch_norm_elemt``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``). They raise NotImplementedError on CPU, so on CPU the same
arithmetic goes through the fused eval-mode ``batch_norm`` kernel (normalise with given
statistics, one pass) and the eval-mode ``native_batch_norm_backward`` (the two per-channel
gradient sums, one pass). Statistics and the per-channel coefficients are float32 (float64 for
float64 input) whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class GradientSums(NamedTuple):
    """Per-channel sums of this rank's part of the backward pass."""

    sum_dy: Tensor  # sum of dy
    sum_dy_xmu: Tensor  # sum of dy * (x - mean)
    grad_weight: Optional[Tensor]  # sum of dy * xhat (this rank's share of the weight gradient)
    grad_bias: Optional[Tensor]  # sum of dy (this rank's share of the bias gradient)


def keep_layout(x: Tensor) -> Tensor:
    """``x`` itself when dense in NCHW or channels-last order, else a contiguous copy."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def like_layout(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in the same memory layout as ``x`` (gradients arrive in any layout)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.contiguous()


def same_layout(t: Tensor, x: Tensor) -> bool:
    """True when ``t`` has the shape and strides of ``x`` (so a kernel can write into it in place of a new tensor)."""
    return t.shape == x.shape and t.stride() == x.stride() and t.device == x.device


def _per_channel(values: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so that it broadcasts along dim 1 of ``x``."""
    return values.view(1, -1, *([1] * (x.dim() - 2)))


def channel_rows(x: Tensor) -> Optional[Tensor]:
    """``x`` as a (values, C) matrix without a copy when its channels are innermost in memory, else None.

    True of dense (N, C) input and of channels-last / channels-last-3d input. On (N, C) input
    ``addcmul`` takes about half the time of the eval-mode ``batch_norm`` kernel; on channels-last
    input the kernels on this view and on the 4-D tensor were within the noise of each other
    (benchmarks/bench_kernels.py, docs/performance.md), and one code path serves both.
    """
    if x.dim() == 2:
        return x if x.is_contiguous() else None
    if x.is_contiguous():  # channels-first
        return None
    rows = x.movedim(1, -1)
    return rows.reshape(-1, x.shape[1]) if rows.is_contiguous() else None


def _from_rows(rows: Tensor, x: Tensor) -> Tensor:
    """A (values, C) result of ``channel_rows(x)`` back in the shape and memory layout of ``x``."""
    if x.dim() == 2:
        return rows
    return rows.view(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)


def _affine(rows: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``rows * alpha + beta`` per channel (column), one pass.

    The CPU eval-mode ``batch_norm`` kernel computes exactly this (``alpha``, ``beta`` folded from the
    statistics in float32); here they are folded in float64 and rounded once, so this is at least as
    exact.
    """
    return torch.addcmul(beta.to(rows.dtype), rows, alpha.to(rows.dtype))


def normalize(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor, invstd: Tensor,
    eps: float, out: Optional[Tensor] = None,
) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` with the given (global) statistics, one pass.

    ``out`` (CPU, the statistics dtype, laid out like ``x``) receives the result when given.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    if out is not None and not (out.dtype == x.dtype == mean.dtype and same_layout(out, x)):
        out = None
    rows = channel_rows(x) if x.dtype == mean.dtype else None
    if rows is not None:
        alpha = invstd.double() if weight is None else weight.double() * invstd.double()
        beta = -mean.double() * alpha if bias is None else bias.double() - mean.double() * alpha
        if out is None:
            return _from_rows(_affine(rows, alpha, beta), x)
        torch.addcmul(beta.to(rows.dtype), rows, alpha.to(rows.dtype), out=channel_rows(out))
        return out
    if out is None:
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
    # The out= form of the same eval-mode kernel (its statistics outputs stay empty in eval mode).
    no_stats = torch.empty(0, dtype=mean.dtype)
    torch.ops.aten.native_batch_norm.out(
        x, weight, bias, mean, var, False, 0.0, eps, out=out, save_mean=no_stats, save_invstd=no_stats.clone()
    )
    return out


def backward_reduce(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, invstd: Tensor, eps: float,
    weight: Optional[Tensor], weight_needs_grad: bool, bias_needs_grad: bool,
) -> GradientSums:
    """This rank's per-channel gradient sums (one pass over ``dy`` and ``x``)."""
    if x.numel() == 0:
        zeros = torch.zeros_like(mean)
        return GradientSums(zeros, zeros.clone(), zeros.clone(), zeros.clone())
    if x.is_cuda:
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
            dy, x, mean, invstd, weight, True, weight_needs_grad, bias_needs_grad
        )
        return GradientSums(sum_dy, sum_dy_xmu, grad_weight, grad_bias)
    # Eval-mode backward with the global statistics as "running" ones: its weight gradient is
    # sum(dy * (x - mean) * invstd) and its bias gradient sum(dy), both over this rank only.
    x_rows, dy_rows = channel_rows(x), channel_rows(dy)
    if x_rows is not None and dy_rows is not None:
        x, dy = x_rows, dy_rows
    _, dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, mean, var, None, None, False, eps, [False, True, True]
    )
    return GradientSums(sum_dy, dy_xhat / invstd, dy_xhat, sum_dy)


def backward_elemt(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, invstd: Tensor, eps: float,
    weight: Optional[Tensor], sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor,
) -> Tensor:
    """``grad_x = w * invstd * (dy - sum_dy/N - (x - mean) * invstd^2 * sum_dy_xmu/N)`` (global sums)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    if x.is_cuda:
        total = count.to(device=x.device, dtype=torch.int32).reshape(1)
        return torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, total)
    # grad_x = a*dy + k*(x - mean)*invstd + c per channel; the last two terms are one eval-mode
    # batch_norm pass with weight k and bias c, the first one addcmul_ into its result.
    count64 = count.double()
    invstd64 = invstd.double()
    scale = invstd64 if weight is None else weight.double() * invstd64
    k = -scale * invstd64 * (sum_dy_xmu.double() / count64)
    c = -scale * (sum_dy.double() / count64)
    stats_dtype = mean.dtype
    x_rows = channel_rows(x) if x.dtype == stats_dtype else None
    dy_rows = channel_rows(dy) if x_rows is not None else None
    if x_rows is not None and dy_rows is not None:
        alpha = k * invstd64
        grad_rows = _affine(x_rows, alpha, c - mean.double() * alpha)
        return _from_rows(grad_rows.addcmul_(dy_rows, scale.to(stats_dtype)), x)
    grad_x = torch.batch_norm(x, k.to(stats_dtype), c.to(stats_dtype), mean, var, False, 0.0, eps, False)
    return grad_x.addcmul_(dy, _per_channel(scale.to(stats_dtype), x))
