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


def _per_channel(values: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so that it broadcasts along dim 1 of ``x``."""
    return values.view(1, -1, *([1] * (x.dim() - 2)))


def _affine(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``x * alpha + beta`` per channel for a 2-D (N, C) CPU input, in one pass (``addcmul``).

    The CPU eval-mode ``batch_norm`` kernel computes exactly this (``alpha``, ``beta`` folded from the
    statistics), but on (N, C) input it is about twice as slow as ``addcmul`` (measured,
    docs/performance.md); on 3-D to 5-D input it is the faster one. ``alpha``/``beta`` are float64
    here, rounded once to the statistics dtype, so this is at least as exact as the kernel.
    """
    return torch.addcmul(beta.to(x.dtype), x, alpha.to(x.dtype))


def normalize(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor, invstd: Tensor,
    eps: float,
) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` with the given (global) statistics, one pass."""
    if x.numel() == 0:
        return torch.empty_like(x)
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    if x.dim() == 2 and x.dtype == mean.dtype:
        alpha = invstd.double() if weight is None else weight.double() * invstd.double()
        beta = -mean.double() * alpha if bias is None else bias.double() - mean.double() * alpha
        return _affine(x, alpha, beta)
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


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
    if x.dim() == 2 and x.dtype == stats_dtype:
        alpha = k * invstd64
        grad_x = _affine(x, alpha, c - mean.double() * alpha)
    else:
        grad_x = torch.batch_norm(x, k.to(stats_dtype), c.to(stats_dtype), mean, var, False, 0.0, eps, False)
    return grad_x.addcmul_(dy, _per_channel(scale.to(stats_dtype), x))
