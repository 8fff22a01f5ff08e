"""The kernel backends of a training step, and the one place that says which one a device runs.

A backend does the per-element and per-channel work around the two all-reduces of
``_function.SyncBatchNormFunction``; both give the same statistics and the same guarantees:

============  =========================================================================  ===========
backend       kernels                                                                    default on
============  =========================================================================  ===========
``native``    aten ops every device has (``_kernels``, ``_stats.local_moments``): two   CPU, others
              passes over deviations about the rank's rounded mean, an eval-mode
              ``native_batch_norm_backward`` for the per-channel sums
``fused``     torch's SyncBatchNorm kernels: ``batch_norm_stats``, ``batch_norm_elemt``,   CUDA
              ``batch_norm_backward_reduce`` (also, with dy = x, for the rounding of the
              local mean), ``batch_norm_backward_elemt``
============  =========================================================================  ===========

``SYNCNORM_KERNELS=auto|native|fused`` (default ``auto``), read each time a layer runs, overrides
the default. ``fused`` needs the four kernels for the input's device (CUDA has them; on CPU the
tests register stand-ins, tests/fused_cpu.py).

The fused kernels take the statistics in float32 (float64 for float64 input). A float32 mean
``m32`` of the float64 global mean ``m`` misses ``r = m - m32``, which matters when ``|mean| >>
std``; every kernel is exact about ``m32`` (``x - m32`` is exact near the mean), so the per-channel
arguments absorb ``r`` instead: ``batch_norm_elemt`` gets ``bias - r * weight * invstd``, the
backward's ``sum_dy_xmu`` is taken about ``m`` (``- r * sum_dy``) and ``batch_norm_backward_elemt``
gets ``sum_dy - r * invstd^2 * sum_dy_xmu``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import _kernels, _stats

ENVIRONMENT_VARIABLE = "SYNCNORM_KERNELS"
_CHOICES = ("auto", "native", "fused")
FUSED_OPS = ("batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt")

# batch_norm_stats returns 1/sqrt(var + eps); we ask with a negligible eps and invert, so the
# variance we send is not biased by the layer's eps. Representable in float32.
_TINY_EPS = 1e-30


class Saved(NamedTuple):
    """What the backward needs of the forward, per channel in the statistics dtype."""

    weight: Optional[Tensor]
    mean: Tensor  # the global mean rounded to the statistics dtype, m32
    invstd: Tensor
    residual: Tensor  # m - m32 (the float64 global mean minus m32), rounded
    num_values: Tensor  # float64 scalar: the global number of values per channel


class Backend(NamedTuple):
    """One implementation of the per-element work; see the module docstring."""

    name: str
    local_moments: Callable[[Tensor, Optional[Tensor]], _stats.LocalMoments]
    normalize: Callable[[Tensor, _stats.LocalMoments, Tensor, Tensor, Optional[Tensor], Optional[Tensor]], Tensor]
    backward_reduce: Callable[[Tensor, Tensor, Saved], tuple[Tensor, Tensor]]
    backward_elemt: Callable[[Tensor, Tensor, Saved, Tensor, Tensor], Tensor]


def _affine(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            about: Tensor) -> tuple[Tensor, Tensor]:
    """float64 ``alpha = weight * invstd`` and ``beta = bias - (mean - about) * alpha``."""
    alpha = invstd if weight is None else invstd * weight
    beta = (about - mean).mul_(alpha)
    return alpha, beta if bias is None else beta.add_(bias)


def _native_normalize(x: Tensor, local: _stats.LocalMoments, mean: Tensor, invstd: Tensor,
                      weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if local.deviations is None:  # no local values
        return torch.empty_like(x)
    alpha, beta = _affine(mean, invstd, weight, bias, local.shift.double())
    dtype = local.deviations.dtype
    return _kernels.normalize(x, local.deviations, alpha.to(dtype), beta.to(dtype))


def _native_backward_reduce(dy: Tensor, x: Tensor, saved: Saved) -> tuple[Tensor, Tensor]:
    return _kernels.backward_reduce(dy, x, saved.mean, torch.zeros_like(saved.mean))


def _backward_coefficients(saved: Saved, sum_dy: Tensor, sum_dy_xmu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``grad_x = scale * dy + k * (x - m32) + c`` with the global sums (about the float64 mean).

    Folded in float64 and rounded once, so the per-channel sum of ``grad_x`` (zero in exact
    arithmetic, and what a parameter before the layer gets as gradient) stays at rounding level.
    """
    invstd = saved.invstd.double()
    scale = invstd if saved.weight is None else invstd * saved.weight
    per_value = scale / saved.num_values
    k = -(per_value * invstd * invstd * sum_dy_xmu)
    # (x - m) = (x - m32) - r: the residual of the rounded mean moves into the constant.
    c = torch.addcmul(-(per_value * sum_dy), k, saved.residual, value=-1)
    dtype = saved.mean.dtype
    return scale.to(dtype), k.to(dtype), c.to(dtype)


def _native_backward_elemt(dy: Tensor, x: Tensor, saved: Saved, sum_dy: Tensor, sum_dy_xmu: Tensor) -> Tensor:
    scale, k, c = _backward_coefficients(saved, sum_dy, sum_dy_xmu)
    return _kernels.backward_elemt(dy, x, saved.mean, scale, k, c)


NATIVE = Backend("native", _stats.local_moments, _native_normalize, _native_backward_reduce, _native_backward_elemt)


def _fused_local_moments(x: Tensor, scratch: Optional[Tensor] = None) -> _stats.LocalMoments:
    count = _stats.values_per_channel(x)
    if count == 0:
        return _stats.empty_moments(x)
    # One fused Welford kernel: a rounded mean c = m32 and the variance about the exact mean.
    mean, invstd = torch.batch_norm_stats(x, _TINY_EPS)
    var = invstd.double().pow(-2).sub_(_TINY_EPS).clamp_(min=0)
    # The rounding e = mean - c of a large mean is a large fraction of a small spread. The reduce
    # kernel with dy = x gives S = sum x (x - c) = n var + n e^2 + c n e, so n e = (S - n var) / c,
    # with an error of about eps * n * std whatever the mean (x (x - c) is formed exactly enough).
    _, moment, _, _ = torch.batch_norm_backward_reduce(x, x, mean, invstd, None, True, False, False)
    mean64 = mean.double()
    sum_dev = (moment.double() - var * count) / mean64
    sum_dev = torch.where(mean64.abs() > var.sqrt(), sum_dev, 0.0)  # a small mean rounds to a tiny error
    sum_sq_dev = var.mul_(count).addcmul_(sum_dev, sum_dev, value=1 / count)
    dtype = mean.dtype
    return _stats.LocalMoments(count, mean, sum_dev.to(dtype), sum_sq_dev.to(dtype), None)


def _fused_normalize(x: Tensor, local: _stats.LocalMoments, mean: Tensor, invstd: Tensor,
                     weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    dtype = _stats.statistics_dtype(x)
    mean_s = mean.to(dtype)
    # The kernel computes (x - m32) * invstd * weight + bias: the bias absorbs the residual m - m32.
    alpha, beta = _affine(mean, invstd, weight, bias, mean_s.double())
    weight_s = None if weight is None else weight.to(dtype)
    return torch.batch_norm_elemt(x, weight_s, beta.to(dtype), mean_s, invstd.to(dtype), 0.0)


def _fused_backward_reduce(dy: Tensor, x: Tensor, saved: Saved) -> tuple[Tensor, Tensor]:
    sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
        dy, x, saved.mean, saved.invstd, saved.weight, True, False, False
    )
    return sum_dy, sum_dy_xmu


def _fused_backward_elemt(dy: Tensor, x: Tensor, saved: Saved, sum_dy: Tensor, sum_dy_xmu: Tensor) -> Tensor:
    # The kernel takes (x - m32); with (x - m) = (x - m32) - r the residual moves into sum_dy.
    sum_dy_about_m32 = torch.addcmul(sum_dy, saved.residual * saved.invstd * saved.invstd, sum_dy_xmu, value=-1)
    count = saved.num_values.to(torch.int32).reshape(1)  # int32 counts whose sum is the global count
    return torch.batch_norm_backward_elemt(
        dy, x, saved.mean, saved.invstd, saved.weight, sum_dy_about_m32, sum_dy_xmu, count
    )


FUSED = Backend("fused", _fused_local_moments, _fused_normalize, _fused_backward_reduce, _fused_backward_elemt)


def _setting() -> str:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "auto")
    normalised = value.strip().lower() or "auto"
    if normalised not in _CHOICES:
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE} must be one of {', '.join(_CHOICES)}, got {value!r}; unset it for the "
            "default (auto: fused on CUDA tensors, native elsewhere)."
        )
    return normalised


def _dispatch_key(device: torch.device) -> str:
    return "CUDA" if device.type == "cuda" else device.type.upper()


def missing_fused_ops(device: torch.device) -> list[str]:
    """The fused kernels that have no implementation for ``device`` (empty where ``fused`` can run)."""
    key = _dispatch_key(device)
    return [op for op in FUSED_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)]


def choose(x: Tensor, missing_ops: Callable[[torch.device], Sequence[str]] = missing_fused_ops) -> Backend:
    """The backend for a training step on ``x``: ``SYNCNORM_KERNELS``, else fused for CUDA tensors, else native.

    ``missing_ops`` is ``missing_fused_ops`` or, while dynamo traces, the same answer as a constant.
    """
    setting = _setting()
    if setting == "native":
        return NATIVE
    if setting == "auto":
        return FUSED if x.device.type == "cuda" else NATIVE
    missing = missing_ops(x.device)
    if missing:
        raise RuntimeError(
            f"{ENVIRONMENT_VARIABLE}=fused, but torch has no {x.device.type} kernel for "
            f"{', '.join('torch.' + op for op in missing)} (the fused kernels are CUDA-only); unset "
            f"{ENVIRONMENT_VARIABLE} or set it to native for {x.device.type} tensors."
        )
    return FUSED
