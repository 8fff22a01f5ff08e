"""Per-channel moments of one rank's batch, and their exact merge across ranks.

Pure tensor math: nothing here talks to other processes. ``_comm`` sums the packed buffer
across ranks; this module makes that sum mean the right thing.

The merge works on float64 sums ``(n, sum x, sum x^2)`` rebuilt from each rank's *stable*
local moments ``(n, mean, var)``. The local moments come from a two-pass kernel (so a large
mean does not swamp a small variance inside one rank), and the cross-rank combination is done
in float64 (so it does not swamp it across ranks either). Summing raw ``x`` and ``x^2`` in
float32, as naive synchronised BatchNorms do, returns noise for data with ``|mean| >> std``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _kernels

# batch_norm_stats (CUDA) returns 1/sqrt(var + eps); we ask with a negligible eps and invert,
# so the variance we send is not biased by the layer's eps. Representable in float32.
_TINY_EPS = 1e-30


class LocalMoments(NamedTuple):
    """One rank's per-channel sums, taken about a per-channel shift close to the local mean."""

    num_values: int  # values per channel on this rank
    shift: Tensor  # (C,) the shift c
    sum_dev: Tensor  # (C,) sum of (x - c)
    sum_sq_dev: Tensor  # (C,) sum of (x - c)^2


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


def local_moments(x: Tensor, scratch: Optional[Tensor] = None) -> LocalMoments:
    """This rank's per-channel sums about a shift near its mean, accurate even when |mean| >> std.

    ``scratch``, when given, is a tensor of the statistics dtype with the shape and memory layout of
    ``x`` whose content may be overwritten (the layer passes its output buffer): the deviations from
    the shift are written there instead of into a new activation-sized tensor.
    """
    dtype = statistics_dtype(x)
    count = values_per_channel(x)
    channels = x.shape[1]
    if count == 0:
        zeros = torch.zeros(channels, dtype=dtype, device=x.device)
        return LocalMoments(0, zeros, zeros.clone(), zeros.clone())
    if x.is_cuda:
        # One fused Welford kernel: the mean and the variance about it.
        mean, invstd = torch.batch_norm_stats(x, _TINY_EPS)
        var = invstd.double().pow(-2).sub_(_TINY_EPS).clamp_(min=0)
        return LocalMoments(count, mean.to(dtype), torch.zeros_like(mean, dtype=dtype), (var * count).to(dtype))
    # Two passes over deviations from the (rounded) mean: x - shift is exact in floating point for
    # values near the shift, so neither a large mean nor the rounding of the shift itself is lost.
    # The CPU kernels keep the input dtype: upcast float16/bfloat16 first (into a copy we own, which
    # then holds the deviations in place).
    upcast = x.dtype != dtype
    x_acc = x.to(dtype) if upcast else x
    if upcast:
        scratch = x_acc
    elif scratch is not None and not (scratch.dtype == dtype and _kernels.same_layout(scratch, x)):
        scratch = None
    ones = torch.ones(channels, dtype=dtype, device=x.device)
    # deviation = x - shift, rounded once whichever kernel computes it. Channels-innermost input
    # ((N, C), channels-last) is handled as a (values, C) matrix, like in _kernels. A broadcast
    # subtraction is as fast as the batch_norm kernel (weight 1, bias -shift) on channels-first input
    # and faster on (N, C) input (benchmarks/bench_kernels.py); the kernel serves other layouts.
    rows = _kernels.channel_rows(x_acc)
    if rows is not None:
        shift = rows.sum(0).div_(count)
        scratch_rows = None if scratch is None else _kernels.channel_rows(scratch)
        deviation = rows - shift if scratch_rows is None else torch.sub(rows, shift, out=scratch_rows)
    else:
        shift = x_acc.sum(reduce_dims(x)).div_(count)
        if x_acc.is_contiguous():
            shift_view = shift.view(1, channels, *([1] * (x.dim() - 2)))
            deviation = x_acc - shift_view if scratch is None else torch.sub(x_acc, shift_view, out=scratch)
        else:
            deviation = torch.batch_norm(x_acc, None, None, shift, ones, False, 0.0, 0.0, False)
    _, sum_sq_dev, sum_dev = torch.ops.aten.native_batch_norm_backward(
        deviation, deviation, None, torch.zeros_like(shift), ones, None, None, False, 0.0, [False, True, True]
    )
    return LocalMoments(count, shift, sum_dev, sum_sq_dev)


def pack_moments(local: LocalMoments) -> Tensor:
    """One float64 buffer ``[n, sum x (C), sum x^2 (C)]`` whose sum over ranks merges every rank's moments.

    Its size, 2C+1, depends on the channel count only, never on the number of ranks. The sums are
    rebuilt from the shifted ones in float64, where the large terms are exact enough.
    """
    channels = local.shift.numel()
    shift = local.shift.double()
    sum_dev = local.sum_dev.double()
    packed = torch.empty(1 + 2 * channels, dtype=torch.float64, device=shift.device)
    packed[0] = local.num_values
    torch.add(sum_dev, shift, alpha=local.num_values, out=packed[1 : 1 + channels])
    # sum x^2 = sum (x-c)^2 + 2 c sum (x-c) + n c^2
    sum_sq = local.sum_sq_dev.double().addcmul_(shift, sum_dev, value=2).addcmul_(shift, shift, value=local.num_values)
    packed[1 + channels :] = sum_sq
    return packed


def unpack_moments(summed: Tensor) -> GlobalMoments:
    """Global count, mean and biased variance from the rank-summed buffer of ``pack_moments``.

    With a global count of zero the mean and variance are NaN; callers check the count first.
    """
    channels = (summed.numel() - 1) // 2
    num_values = summed[0]
    mean = summed[1 : 1 + channels] / num_values
    mean_of_squares = summed[1 + channels :] / num_values
    # Rounding can push a zero variance a hair below zero; a variance is never negative.
    var = mean_of_squares.sub_(mean * mean).clamp_(min=0)
    return GlobalMoments(num_values, mean, var)


def unbiased_var(moments: GlobalMoments) -> Tensor:
    """Variance with Bessel's correction over the GLOBAL count (what running_var tracks)."""
    return moments.var * (moments.num_values / (moments.num_values - 1))

