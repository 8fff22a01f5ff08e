"""The per-channel prologue and epilogue of a training step on CPU tensors, as numpy operations.

At the small per-rank batches syncnorm is for, a layer step is decided by the host: every aten op
is a dispatch of several microseconds, and the ~30 small per-channel operations around the two
all-reduces (``_stats.pack_moments``, ``_stats.finish_statistics``, the backward's sums) cost more
than the layer's per-element work. Here they are numpy operations on the same memory (no copies),
each a fraction of that: the CPU counterpart of ``_triton`` (one kernel per side on a GPU), with
the same float64 formulas. Used for eager steps on CPU tensors whose statistics and parameters
are float32 or float64 (numpy has no bfloat16) and never while dynamo traces; elsewhere ``_stats``'
aten ops run. tests/test_cpu_kernels.py compares both on the same buffers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _stats

_NUMPY_DTYPES = (torch.float32, torch.float64)


def usable(*tensors: Optional[Tensor]) -> bool:
    """Whether every given tensor (None ignored) is a CPU tensor numpy can view: float32 or float64."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES) for t in tensors)


def _copy(t: Tensor) -> np.ndarray:
    """A COPY of a tensor this module does not own (a parameter) as an array.

    ``.numpy()`` on a tensor's own memory marks its storage non-resizable for good, and FSDP2 frees
    and re-allocates parameter storages by resizing them: only syncnorm's own temporaries are viewed.
    """
    return t.detach().clone().numpy()


def pack_moments(local: _stats.LocalMoments, shifts: Optional[Tensor]) -> Tensor:
    """``_stats.pack_moments`` in numpy: ``[n, sum (x - s_k) (K x C), sum (x - s_k)^2 (K x C)]``, float64."""
    n = local.num_values
    c = local.shift.numpy()
    channels = c.shape[0]
    delta = c[None, :].astype(np.float64) if shifts is None else c - shifts.numpy().reshape(-1, channels)
    rows = delta.shape[0]
    packed = np.empty(1 + 2 * rows * channels)
    packed[0] = n
    moved = packed[1 : 1 + rows * channels].reshape(rows, channels)
    sum_dev = local.sum_dev.numpy()
    np.add(sum_dev, n * delta, out=moved)
    # sum (x-s)^2 = sum (x-c)^2 + delta (sum (x-c) + sum (x-s)), as in _stats.pack_moments
    squares = packed[1 + rows * channels :].reshape(rows, channels)
    np.add(local.sum_sq_dev.numpy(), delta * (sum_dev + moved), out=squares)
    return torch.from_numpy(packed)


def finish_statistics(
    summed: Tensor, shifts: Optional[Tensor], about: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, dtype: torch.dtype, running_mean: Optional[Tensor],
    running_var: Optional[Tensor], momentum: float, next_shifts: Optional[Tensor], guard_empty: bool,
    int_count: bool = False,
) -> _stats.PerChannel:
    """``_stats.finish_statistics``, the running statistics and the next candidates, in numpy float64.

    The same values as ``_triton.finish_statistics`` (one GPU kernel): per channel the candidate nearer
    this step's mean, then mean, invstd, the residual of the rounded mean, the normalisation and
    backward coefficients, rounded once to ``dtype``. ``int_count``: also the int32 count (fused).
    """
    total = summed.numpy()
    n = total[0]  # a numpy float64 in host memory: reading it is no device synchronisation
    if n > 1:
        return _finish(total, n, shifts, about, weight, bias, eps, dtype, running_mean, running_var, momentum,
                       next_shifts, guard_empty, int_count, summed)
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty global batch: NaN, as the aten path
        return _finish(total, n, shifts, about, weight, bias, eps, dtype, running_mean, running_var, momentum,
                       next_shifts, guard_empty, int_count, summed)


def _finish(total: np.ndarray, n: np.float64, shifts: Optional[Tensor], about: Optional[Tensor],
            weight: Optional[Tensor], bias: Optional[Tensor], eps: float, dtype: torch.dtype,
            running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
            next_shifts: Optional[Tensor], guard_empty: bool, int_count: bool, summed: Tensor) -> _stats.PerChannel:
    channels = (total.shape[0] - 1) // 2 if shifts is None else shifts.shape[-1]
    rows = (total.shape[0] - 1) // (2 * channels)
    moments = total[1:].reshape(2, rows, channels) / n
    mean_dev = moments[0]
    var = moments[1] - mean_dev * mean_dev
    candidates = np.zeros((1, channels)) if shifts is None else shifts.numpy().reshape(rows, channels)
    if rows == 2:
        nearer = np.abs(mean_dev[1]) < np.abs(mean_dev[0])
        chosen = np.where(nearer, candidates[1], candidates[0])
        mean = np.where(nearer, mean_dev[1], mean_dev[0]) + chosen
        var = np.where(nearer, var[1], var[0])
    else:
        chosen = candidates[0]
        mean, var = mean_dev[0] + chosen, var[0]
    var[var < 0] = 0.0  # rounding can make it a hair negative; NaN stays NaN
    block = np.empty((8, channels), dtype=np.float64 if dtype == torch.float64 else np.float32)
    block[0] = mean
    residual = mean - block[0]
    invstd = 1.0 / np.sqrt(var + eps)
    alpha = invstd if weight is None else invstd * _copy(weight)
    offset = residual if about is None else mean - about.numpy()
    beta = -offset * alpha if bias is None else _copy(bias) - offset * alpha
    invstd2 = invstd * invstd
    coef = alpha * (-1.0 / n)
    block[1], block[2], block[3], block[4], block[5], block[6] = invstd, residual, residual * invstd2, alpha, beta, coef
    block[7] = coef * invstd2
    if running_mean is not None and running_var is not None and not (guard_empty and not n > 0):
        _update_running(running_mean, running_var, mean, var * (n / (n - 1)), momentum)
    if next_shifts is not None:
        following = next_shifts.numpy()
        following[0] = np.where(np.isfinite(mean), mean, candidates[0])
        following[1] = chosen
    rows_t = torch.from_numpy(block).unbind(0)
    count = torch.tensor([int(n)], dtype=torch.int32) if int_count else None
    return _stats.PerChannel(summed[0], rows_t[0], rows_t[1], rows_t[2], rows_t[3], rows_t[4], rows_t[5],
                             torch.from_numpy(block[6:]), count, None, None)


def _update_running(running_mean: Tensor, running_var: Tensor, mean: np.ndarray, unbiased: np.ndarray,
                    momentum: float) -> None:
    """``running += momentum * (statistic - running)`` in place, one aten op: the buffers are not this module's
    to view as arrays (``_copy``)."""
    targets = [torch.from_numpy(mean).to(running_mean.dtype), torch.from_numpy(unbiased).to(running_var.dtype)]
    torch._foreach_lerp_([running_mean, running_var], targets, momentum)


def backward_sums(sum_dy: Tensor, sum_dy_xmu: Tensor, residual: Tensor, r_invstd2: Tensor) -> Tensor:
    """``_function.backward_gradients``' (2, C) sums to all-reduce, in numpy: ``[sum dy - r invstd^2 S, S]``
    with ``S = sum dy (x - m) = sum dy (x - m32) - r sum dy``."""
    dy_sum = sum_dy.numpy()
    sums = np.empty((2, dy_sum.shape[0]), dtype=dy_sum.dtype)
    np.subtract(sum_dy_xmu.numpy(), residual.numpy() * dy_sum, out=sums[1])
    np.subtract(dy_sum, r_invstd2.numpy() * sums[1], out=sums[0])
    return torch.from_numpy(sums)
