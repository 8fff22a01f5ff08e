"""The ``native`` kernels: per-element work of the synchronised layer from aten ops every device has.

The other backend, ``fused`` (torch's SyncBatchNorm kernels), is in ``_backends``, which also says
which one a device runs. Both take and give the same per-channel statistics: float32 (float64 for
float64 input) whatever the input dtype, and neither ever folds a large mean into a per-channel
bias: the forward normalises the deviations about the rank's own rounded mean that the statistics
pass already wrote into the output buffer, and the backward works on ``x - mean`` rounded once, so
``|mean| >> std`` costs no digits beyond those of the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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


def per_channel(values: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so that it broadcasts along dim 1 of ``x`` (any memory layout)."""
    return values.view(1, -1, *([1] * (x.dim() - 2)))


def channel_rows(x: Tensor) -> Optional[Tensor]:
    """``x`` as a (values, C) matrix without a copy when its channels are innermost in memory, else None.

    True of dense (N, C) input and of channels-last / channels-last-3d input. On (N, C) input the
    column sums of this view are faster than a reduction over dim 0 of the 4-D tensor
    (benchmarks/bench_kernels.py, docs/performance.md).
    """
    if x.dim() == 2:
        return x if x.is_contiguous() else None
    if x.is_contiguous():  # channels-first
        return None
    rows = x.movedim(1, -1)
    return rows.reshape(-1, x.shape[1]) if rows.is_contiguous() else None


def from_rows(rows: Tensor, x: Tensor) -> Tensor:
    """A (values, C) result of ``channel_rows(x)`` back in the shape and memory layout of ``x``."""
    if x.dim() == 2:
        return rows
    return rows.view(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)


def affine(src: Tensor, alpha: Tensor, beta: Tensor, out: Tensor, zeros: Optional[Tensor] = None) -> Tensor:
    """``out = src * alpha + beta`` per channel (``out`` may be ``src``), on the fastest kernel for the layout.

    On CPU a broadcast ``addcmul`` over channels-first input is 3-5x slower than the eval-mode
    ``batch_norm`` kernel, which computes the same ``src * w + b`` when given a zero mean, a zero
    variance and ``eps = 1`` (its ``invstd`` is then exactly 1, so ``w = alpha`` and ``b = beta``
    unchanged); with channels innermost ((N, C), channels-last) ``addcmul`` on the (values, C) view
    is the faster one. Measured, one thread, float32: (32,64,28,28) 0.62 ms (batch_norm, in place) vs
    2.96 ms (broadcast addcmul); channels-last 0.79 ms (rows addcmul) vs 1.33 ms (batch_norm).
    ``zeros``: a (C,) zero tensor of ``alpha``'s dtype to use for those statistics (else one is made).
    """
    if src.dim() > 2 and src.is_contiguous() and src.dtype == alpha.dtype == out.dtype and out.is_contiguous():
        zero = torch.zeros_like(alpha) if zeros is None else zeros
        no_stats = torch.empty(0, dtype=alpha.dtype, device=alpha.device)
        torch.ops.aten.native_batch_norm.out(
            src, alpha, beta, zero, zero, False, 0.0, 1.0, out=out, save_mean=no_stats, save_invstd=no_stats
        )
        return out
    src_rows, out_rows = channel_rows(src), channel_rows(out)
    if src_rows is not None and out_rows is not None:
        torch.addcmul(beta, src_rows, alpha, out=out_rows)
        return out
    return torch.addcmul(per_channel(beta, src), src, per_channel(alpha, src), out=out)


def normalize(x: Tensor, deviations: Tensor, alpha: Tensor, beta: Tensor, zeros: Optional[Tensor] = None) -> Tensor:
    """``y = deviations * alpha + beta`` per channel, in the input's dtype and layout; one pass.

    ``deviations`` are ``x - c`` about the rank's own rounded mean ``c`` (statistics dtype, laid out
    like ``x``); ``alpha = weight * invstd`` and ``beta = bias - (mean - c) * alpha`` carry only the
    small difference between ``c`` and the global mean, so no large term cancels. When the
    deviations have the input's dtype they are the output buffer and are overwritten in place.
    """
    out = deviations if deviations.dtype == x.dtype else torch.empty_like(x)
    return affine(deviations, alpha, beta, out, zeros)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, unit: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's ``(sum dy, sum dy * (x - mean))`` per channel, one pass over ``dy`` and ``x``.

    The eval-mode BatchNorm backward with ``mean`` as running mean, a zero running variance and
    ``eps = 1`` (so its ``invstd`` is exactly 1) returns both sums as its bias and weight gradients.
    ``unit`` is a zero (C,) tensor of the statistics dtype.
    """
    _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, mean, unit, None, None, False, 1.0, [False, True, True]
    )
    return sum_dy, sum_dy_xmu


def backward_elemt(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, k: Tensor, c: Tensor,
                   zeros: Optional[Tensor] = None) -> Tensor:
    """``grad_x = scale * dy + k * (x - mean) + c`` per channel, in the input's dtype and layout.

    ``x - mean`` is rounded once (exact for values near the mean); the sum is formed in the
    statistics dtype and rounded to the input dtype once at the end, so a float16 ``scale * dy`` that
    would overflow, or cancel against the other terms, never exists in float16.
    """
    grad = torch.sub(x, per_channel(mean, x))
    affine(grad, k, c, out=grad, zeros=zeros)
    grad.addcmul_(dy, per_channel(scale, x))
    return grad if grad.dtype == x.dtype else grad.to(x.dtype)
