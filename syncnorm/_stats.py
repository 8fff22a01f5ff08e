"""Per-channel moments of one rank's batch, and their merge across ranks.

Pure tensor math: nothing here talks to other processes. ``_comm`` sums the packed buffer
across ranks; this module makes that sum mean the right thing.

Every rank sends ``(n, sum (x - s), sum (x - s)^2)`` in float64 about a shift ``s`` that is the
SAME on every rank: zero for float32, float16 and bfloat16 input, and for float64 input the global
mean, found by a first all-reduce of ``(n, sum x)`` (``_function.merged_statistics``). The sums come
from each rank's stable local moments about its own shift ``c`` (deviations ``x - c`` summed in the
statistics dtype, so a large mean does not swamp a small variance inside one rank), moved to ``s``
in float64. The merged variance then carries a rounding error of about ``1e-16 * ((mean - s) / std)^2``:
about zero that is below float32's own error (about ``1e-7 * mean / std``) for any data float32 can
represent meaningfully (mean/std below ~5e8), and about the global mean it is float64's rounding.
Nothing is kept between steps. Summing raw ``x`` and ``x^2`` in float32, as naive synchronised
BatchNorms do, returns noise for ``|mean| >> std``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _kernels


class LocalMoments(NamedTuple):
    """One rank's per-channel sums, taken about a per-channel shift close to the local mean."""

    num_values: int  # values per channel on this rank
    shift: Tensor  # (C,) the shift c, statistics dtype
    sum_dev: Tensor  # (C,) sum of (x - c)
    sum_sq_dev: Tensor  # (C,) sum of (x - c)^2
    deviations: Optional[Tensor]  # x - c laid out like x (statistics dtype), when a kernel kept them
    zeros: Optional[Tensor] = None  # (C,) zeros of the statistics dtype the native kernels take as "no statistics"
    # True: sum_dev and sum_sq_dev hold batch_norm_stats' invstd and sum x (x - c), which the fused
    # backend's Triton pack kernel turns into the sums itself (_backends._fused_local_moments)
    welford: bool = False


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel one (dim 1)."""
    return [0, *range(2, x.dim())]


def values_per_channel(x: Tensor) -> int:
    """Number of values of one channel in this rank's batch."""
    return x.numel() // x.shape[1]


def statistics_dtype(x: Tensor) -> torch.dtype:
    """float32 for float32/float16/bfloat16 input (fp32 accumulation), float64 for float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def empty_moments(x: Tensor) -> LocalMoments:
    """The moments of a rank without values (it still joins the all-reduce with zeros)."""
    zeros = torch.zeros(3, x.shape[1], dtype=statistics_dtype(x), device=x.device)
    return LocalMoments(0, zeros[0], zeros[1], zeros[2], None)


def local_moments(x: Tensor, scratch: Optional[Tensor] = None) -> LocalMoments:
    """This rank's per-channel sums about its rounded mean, with the aten kernels of any device (``native``).

    ``scratch``, when given, is a tensor of the statistics dtype with the shape and memory layout of
    ``x`` whose content may be overwritten (the layer passes its output buffer): the deviations from
    the shift are written there, and returned in ``deviations`` for the normalisation to reuse.
    """
    dtype = statistics_dtype(x)
    count = values_per_channel(x)
    channels = x.shape[1]
    if count == 0:
        return empty_moments(x)
    # Two passes over deviations from the (rounded) mean: x - shift is exact in floating point for
    # values near the shift, so neither a large mean nor the rounding of the shift itself is lost.
    # The kernels keep the input dtype: upcast float16/bfloat16 first (into a copy we own, which
    # then holds the deviations in place).
    upcast = x.dtype != dtype
    x_acc = x.to(dtype) if upcast else x
    if upcast:
        scratch = x_acc
    elif scratch is not None and not (scratch.dtype == dtype and _kernels.same_layout(scratch, x)):
        scratch = None
    # deviation = x - shift, rounded once. Channels-innermost input ((N, C), channels-last) is
    # handled as a (values, C) matrix, like in _kernels; other layouts broadcast a (1, C, 1...) view.
    rows = _kernels.channel_rows(x_acc)
    if rows is not None:
        shift = rows.mean(0)
        scratch_rows = None if scratch is None else _kernels.channel_rows(scratch)
        deviation = rows - shift if scratch_rows is None else torch.sub(rows, shift, out=scratch_rows)
        deviations = _kernels.from_rows(deviation, x) if scratch is None else scratch
    else:
        x_acc = x_acc.contiguous()
        shift = x_acc.mean(reduce_dims(x))
        shift_view = _kernels.per_channel(shift, x)
        deviation = x_acc - shift_view if scratch is None else torch.sub(x_acc, shift_view, out=scratch)
        deviations = deviation
    # The eval-mode backward with zero statistics and eps = 1 (so its invstd is exactly 1) gives
    # sum dy * (x - 0) and sum dy in one pass: with dy = x = deviation, the two sums we need.
    zeros = torch.zeros(channels, dtype=dtype, device=x.device)
    _, sum_sq_dev, sum_dev = torch.ops.aten.native_batch_norm_backward(
        deviation, deviation, None, zeros, zeros, None, None, False, 1.0, [False, True, True]
    )
    return LocalMoments(count, shift, sum_dev, sum_sq_dev, deviations, zeros)


def pack_moments(local: LocalMoments, shift: Optional[Tensor] = None) -> Tensor:
    """One float64 buffer whose sum over ranks merges every rank's moments about a common shift.

    ``shift`` is float64 ``(C,)``, the same on every rank; None: about zero. The buffer is
    ``[n, sum (x - s) (C), sum (x - s)^2 (C)]``: 2C + 1 values, a size that depends on the channel
    count only, never on the number of ranks. Five small ops (a per-channel kernel does it in one
    where Triton runs: ``_triton.pack_moments``).
    """
    channels = local.shift.numel()
    n = local.num_values
    # delta = c - s; every op below has a float64 operand, so the float32 sums are upcast exactly and
    # summed in float64.
    delta = local.shift.double() if shift is None else local.shift - shift
    packed = torch.empty(1 + 2 * channels, dtype=torch.float64, device=delta.device)
    packed[:1].fill_(n)
    sum_dev = torch.add(local.sum_dev, delta, alpha=n, out=packed[1 : 1 + channels])
    # sum (x-s)^2 = sum (x-c)^2 + 2 delta sum (x-c) + n delta^2 = sum (x-c)^2 + delta (sum (x-c) + sum (x-s))
    torch.addcmul(local.sum_sq_dev, delta, sum_dev + local.sum_dev, out=packed[1 + channels :])
    return packed


def global_mean(summed: Tensor) -> Tensor:
    """The global mean ``(C,)`` from the rank-summed ``[n, sum x]`` head of a ``pack_moments`` buffer about zero.

    float64 input sums about this in a second all-reduce: it is the exact mean to a few float64 ulps,
    so those sums lose nothing to cancellation. A non-finite mean (NaN data, an empty global batch)
    becomes zero, so the second pass stays finite wherever the data are.
    """
    mean = summed[1:] / summed[0]
    return torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0)


class PerChannel(NamedTuple):
    """The per-channel values of a training step once the global moments are known (statistics dtype).

    What the normalisation and the backward of either backend read; ``finish_statistics`` (aten ops)
    and its fused twin ``_triton.finish_statistics`` (one kernel) compute them with the same float64
    operations in the same order, rounded once: bitwise the same values.
    """

    num_values: Tensor  # float64, one value: the global number of values per channel
    mean: Tensor  # the global mean m rounded, m32
    invstd: Tensor  # 1 / sqrt(var + eps)
    residual: Tensor  # m - m32, rounded
    r_invstd2: Tensor  # residual * invstd^2 (the backward folds the residual into its sums)
    alpha: Tensor  # weight * invstd
    beta: Tensor  # bias - (m - about) * alpha: y = (x - about) * alpha + beta
    coef: Optional[Tensor]  # (2, C): -(alpha / n) * [1, invstd^2], the backward's per-sum factors (native)
    int_count: Optional[Tensor]  # int32 (1,): the global count, as batch_norm_backward_elemt takes it (fused)
    moments: Optional[Tensor]  # float64 (2, C): global mean and biased variance (None: the kernel used them)


def finish_statistics(
    summed: Tensor, shift: Optional[Tensor], about: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, dtype: torch.dtype, *, coefficients: bool, int_count: bool,
) -> PerChannel:
    """Every per-channel value of the step from the rank-summed buffer of ``pack_moments`` (same ``shift``).

    ``shift``: the ``(C,)`` shift the buffer was packed about (None: zero). ``about`` is the
    per-channel point the normalisation measures from (the native kernels' local shift ``c``); None:
    the rounded global mean itself (the fused kernels). Every value is formed in float64 and rounded
    once, by the same operations as ``_triton``'s finish kernel (the tests compare them bit for bit).
    ``coefficients``: also the native backward's factors; ``int_count``: also the fused backward's
    int32 count. With a global count of zero the values are NaN; callers check the count first.
    """
    channels = (summed.numel() - 1) // 2
    num_values = summed[0]
    # Rows: mean, var, residual, invstd, residual * invstd^2, alpha, beta, coef (2); float64, rounded once.
    block = torch.empty(9, channels, dtype=torch.float64, device=summed.device)
    moments = torch.div(summed[1:].view(2, channels), num_values, out=block[:2])
    mean, var = moments
    # Rounding can push a zero variance a hair below zero; a variance is never negative (NaN stays NaN).
    var.sub_(mean * mean).clamp_(min=0)
    if shift is not None:
        mean.add_(shift)
    residual = torch.sub(mean, mean.to(dtype), out=block[2])
    invstd = torch.add(var, eps, out=block[3]).sqrt_().reciprocal_()
    alpha = block[5].copy_(invstd) if weight is None else torch.mul(invstd, weight, out=block[5])
    offset = residual if about is None else mean - about
    beta = torch.mul(offset, alpha, out=block[6]).neg_()
    if bias is not None:
        beta.add_(bias)
    invstd2 = invstd * invstd
    torch.mul(residual, invstd2, out=block[4])
    if coefficients:
        torch.mul(torch.div(alpha, num_values, out=block[7]).neg_(), invstd2, out=block[8])
    rounded = block.to(dtype)
    count = summed[:1].to(torch.int32) if int_count else None
    return PerChannel(num_values, rounded[0], rounded[3], rounded[2], rounded[4], rounded[5], rounded[6],
                      rounded[7:] if coefficients else None, count, moments)


def update_running_statistics(running_mean: Tensor, running_var: Tensor, stats: PerChannel, momentum: float | Tensor,
                              *, guard_empty: bool = False) -> None:
    """``update_running`` from a step's ``finish_statistics``."""
    assert stats.moments is not None
    update_running(running_mean, running_var, stats.num_values, stats.moments, momentum, guard_empty=guard_empty)


def update_running(running_mean: Tensor, running_var: Tensor, num_values: Tensor, moments: Tensor,
                   momentum: float | Tensor, *, guard_empty: bool = False) -> None:
    """Exponential (momentum=None: cumulative, given as 1/step) average of the GLOBAL statistics, in place.

    ``running + momentum * (statistic - running)`` in float64, rounded once to the buffer's dtype, the
    variance unbiased with the global count ``num_values``: the same operations as ``_triton``'s finish
    kernel, and the one update of eager and compiled steps alike. ``moments``: float64 ``(2, C)``, the
    global mean and biased variance. ``guard_empty``: the global count may be zero (not read on the
    host): the buffers then keep their values.
    """
    old = torch.stack([running_mean, running_var]).double()
    target = moments.clone()
    target[1].mul_(num_values / (num_values - 1))
    new = old + momentum * (target - old)
    if guard_empty:
        new = torch.where(num_values > 0, new, old)
    torch._foreach_copy_([running_mean, running_var], list(new.unbind(0)))
