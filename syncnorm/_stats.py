"""Per-channel moments of one rank's batch, and their exact merge across ranks.

Pure tensor math: nothing here talks to other processes. ``_comm`` sums the packed buffer
across ranks; this module makes that sum mean the right thing.

Every rank sends ``(n, sum (x - s), sum (x - s)^2)`` in float64 about a shift ``s`` that is the
SAME on every rank (the layer's previous global batch mean, ``SyncBatchNorm`` keeps it; zero on
the first training step of a fresh layer). The sums come from each rank's stable local moments
about its own shift ``c`` (deviations ``x - c`` summed in the statistics dtype, so a large mean does
not swamp a small variance inside one rank), moved to ``s`` in float64. The merged variance then
carries a rounding error of about ``1e-16 * ((mean - s) / std)^2``: float64 accuracy once ``s`` is
last step's mean, and ``1e-16 * (mean / std)^2`` on a fresh layer's first step. Summing raw ``x``
and ``x^2`` in float32, as naive synchronised BatchNorms do, returns noise for ``|mean| >> std``.
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


class GlobalMoments(NamedTuple):
    """Statistics of the whole (all-rank) batch, per channel."""

    num_values: Tensor  # float64 scalar: number of values per channel over every rank
    mean: Tensor  # float64 (C,)
    var: Tensor  # float64 (C,), biased (divided by count): the one used to normalise


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
        shift = rows.sum(0).div_(count)
        scratch_rows = None if scratch is None else _kernels.channel_rows(scratch)
        deviation = rows - shift if scratch_rows is None else torch.sub(rows, shift, out=scratch_rows)
        deviations = _kernels.from_rows(deviation, x) if scratch is None else scratch
    else:
        x_acc = x_acc.contiguous()
        shift = x_acc.sum(reduce_dims(x)).div_(count)
        shift_view = _kernels.per_channel(shift, x)
        deviation = x_acc - shift_view if scratch is None else torch.sub(x_acc, shift_view, out=scratch)
        deviations = deviation
    ones = torch.ones(channels, dtype=dtype, device=x.device)
    _, sum_sq_dev, sum_dev = torch.ops.aten.native_batch_norm_backward(
        deviation, deviation, None, torch.zeros_like(shift), ones, None, None, False, 0.0, [False, True, True]
    )
    return LocalMoments(count, shift, sum_dev, sum_sq_dev, deviations)


def pack_moments(local: LocalMoments, shift: Optional[Tensor] = None) -> Tensor:
    """One float64 buffer ``[n, sum (x-s) (C), sum (x-s)^2 (C)]`` whose sum over ranks merges every rank's moments.

    ``s`` is ``shift`` (float64 (C,), the same on every rank; zero when None). Its size, 2C+1,
    depends on the channel count only, never on the number of ranks.
    """
    channels = local.shift.numel()
    # delta = c - s is small once s is near the mean, so the float64 terms below are small too.
    delta = local.shift.double() if shift is None else local.shift.double() - shift
    sum_dev = local.sum_dev.double()
    packed = torch.empty(1 + 2 * channels, dtype=torch.float64, device=delta.device)
    packed[0] = local.num_values
    torch.add(sum_dev, delta, alpha=local.num_values, out=packed[1 : 1 + channels])
    # sum (x-s)^2 = sum (x-c)^2 + 2 delta sum (x-c) + n delta^2
    sum_sq = local.sum_sq_dev.double().addcmul_(delta, sum_dev, value=2).addcmul_(delta, delta, value=local.num_values)
    packed[1 + channels :] = sum_sq
    return packed


def unpack_moments(summed: Tensor, shift: Optional[Tensor] = None) -> GlobalMoments:
    """Global count, mean and biased variance from the rank-summed buffer of ``pack_moments`` (same ``shift``).

    With a global count of zero the mean and variance are NaN; callers check the count first.
    """
    channels = (summed.numel() - 1) // 2
    num_values = summed[0]
    mean_dev = summed[1 : 1 + channels] / num_values
    mean_of_squares = summed[1 + channels :] / num_values
    # Rounding can push a zero variance a hair below zero; a variance is never negative.
    var = mean_of_squares.sub_(mean_dev * mean_dev).clamp_(min=0)
    mean = mean_dev if shift is None else mean_dev.add_(shift)
    return GlobalMoments(num_values, mean, var)


def unbiased_var(moments: GlobalMoments) -> Tensor:
    """Variance with Bessel's correction over the GLOBAL count (what running_var tracks)."""
    return moments.var * (moments.num_values / (moments.num_values - 1))
