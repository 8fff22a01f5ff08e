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

Around the all-reduce both backends do the same per-channel work: pack the local moments about a
shift common to all ranks (``_stats.pack_moments``: zero, or the global mean for float64 input), and
from the summed buffer compute every per-channel value of the step (``finish_statistics``:
``_stats.finish_statistics`` and the running statistics). Where Triton
runs (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``) each side is one kernel (``_triton``), else
~5 and ~20 aten ops. Per training step, ops dispatched (tests/test_op_counts.py asserts them):

=====================  ====================================  ==========================================
setting                forward                               backward
=====================  ====================================  ==========================================
fused + Triton (GPU)   stats, reduce(x, x), pack, all-reduce, reduce, 3 small ops, all-reduce,
                       finish, elemt: 6 (+1 module counter)  backward_elemt: 6
native + Triton        mean, sub, zeros, reduce, pack,       reduce, 3, all-reduce, 2, eval-mode
                       all-reduce, finish, normalise: 8 (+1) batch_norm kernel, addcmul: 9
native, aten (CPU)     33 (+1)                               9
=====================  ====================================  ==========================================

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

from . import _kernels, _stats, _triton

ENVIRONMENT_VARIABLE = "SYNCNORM_KERNELS"
_CHOICES = ("auto", "native", "fused")
FUSED_OPS = ("batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt")

# batch_norm_stats returns 1/sqrt(var + eps); we ask with a negligible eps and invert, so the
# variance we send is not biased by the layer's eps. Representable in float32.
_TINY_EPS = 1e-30


class Saved(NamedTuple):
    """What the backward needs of the forward, per channel in the statistics dtype (``_stats.PerChannel``)."""

    weight: Optional[Tensor]  # the weight in the statistics dtype (the fused kernels' argument)
    mean: Tensor  # the global mean rounded to the statistics dtype, m32
    invstd: Tensor
    residual: Tensor  # m - m32 (the float64 global mean minus m32), rounded
    r_invstd2: Tensor  # residual * invstd^2
    alpha: Tensor  # weight * invstd
    coef: Optional[Tensor]  # (2, C) native: -(alpha / n) * [1, invstd^2]
    int_count: Optional[Tensor]  # int32 (1,) fused: the global count
    zeros: Optional[Tensor]  # (C,) zeros for the native kernels


class Backend(NamedTuple):
    """One implementation of the per-element work; see the module docstring."""

    name: str
    # this rank's moments of x (the second argument: a scratch buffer laid out like x, or None)
    local_moments: Callable[[Tensor, Optional[Tensor]], _stats.LocalMoments]
    # the float64 buffer of those moments about a common shift (C,), or about zero (None)
    pack: Callable[[_stats.LocalMoments, Optional[Tensor]], Tensor]
    normalize: Callable[[Tensor, _stats.LocalMoments, _stats.PerChannel, Optional[Tensor]], Tensor]
    backward_reduce: Callable[[Tensor, Tensor, Saved], tuple[Tensor, Tensor]]
    backward_elemt: Callable[[Tensor, Tensor, Saved, Tensor], Tensor]


def _native_pack(local: _stats.LocalMoments, shift: Optional[Tensor]) -> Tensor:
    if _triton.usable(local.shift.device):
        return _triton.pack_moments(local, shift)
    return _stats.pack_moments(local, shift)


def _native_normalize(x: Tensor, local: _stats.LocalMoments, stats: _stats.PerChannel,
                      weight: Optional[Tensor]) -> Tensor:
    if local.deviations is None:  # no local values
        return torch.empty_like(x)
    return _kernels.normalize(x, local.deviations, stats.alpha, stats.beta, local.zeros)


def _native_backward_reduce(dy: Tensor, x: Tensor, saved: Saved) -> tuple[Tensor, Tensor]:
    zeros = torch.zeros_like(saved.mean) if saved.zeros is None else saved.zeros
    return _kernels.backward_reduce(dy, x, saved.mean, zeros)


def _native_backward_elemt(dy: Tensor, x: Tensor, saved: Saved, sums: Tensor) -> Tensor:
    """``grad_x = alpha * dy + k * (x - m32) + c`` with ``[c, k] = coef * sums`` (the global sums)."""
    assert saved.coef is not None
    constant, slope = sums * saved.coef
    return _kernels.backward_elemt(dy, x, saved.mean, saved.alpha, slope, constant, saved.zeros)


NATIVE = Backend("native", _stats.local_moments, _native_pack, _native_normalize, _native_backward_reduce,
                 _native_backward_elemt)


def _fused_local_moments(x: Tensor, scratch: Optional[Tensor]) -> _stats.LocalMoments:
    count = _stats.values_per_channel(x)
    if count == 0:
        return _stats.empty_moments(x)
    # One fused Welford kernel: a rounded mean c = m32 and the variance about the exact mean.
    mean, invstd = torch.batch_norm_stats(x, _TINY_EPS)
    # The rounding e = mean - c of a large mean is a large fraction of a small spread. The reduce
    # kernel with dy = x gives S = sum x (x - c) = n var + n e^2 + c n e, so n e = (S - n var) / c,
    # with an error of about eps * n * std whatever the mean (x (x - c) is formed exactly enough).
    _, moment, _, _ = torch.batch_norm_backward_reduce(x, x, mean, invstd, None, True, False, False)
    if _triton.usable(x.device):  # the pack kernel turns (invstd, moment) into the sums itself
        return _stats.LocalMoments(count, mean, invstd, moment, None, welford=True)
    var = invstd.double().pow(-2).sub_(_TINY_EPS).clamp_(min=0)
    mean64 = mean.double()
    sum_dev = (moment.double() - var * count) / mean64
    sum_dev = torch.where(mean64.abs() > var.sqrt(), sum_dev, 0.0)  # a small mean rounds to a tiny error
    sum_sq_dev = var.mul_(count).addcmul_(sum_dev, sum_dev, value=1 / count)
    return _stats.LocalMoments(count, mean, sum_dev, sum_sq_dev, None)


def _fused_pack(local: _stats.LocalMoments, shift: Optional[Tensor]) -> Tensor:
    if local.welford:
        return _triton.pack_welford_moments(local.shift, local.sum_dev, local.sum_sq_dev, local.num_values, shift,
                                            _TINY_EPS)
    return _stats.pack_moments(local, shift)


def _fused_normalize(x: Tensor, local: _stats.LocalMoments, stats: _stats.PerChannel,
                     weight: Optional[Tensor]) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    # The kernel computes (x - m32) * invstd * weight + beta: beta absorbs the residual m - m32.
    weight_s = None if weight is None else weight.to(stats.mean.dtype)
    return torch.batch_norm_elemt(x, weight_s, stats.beta, stats.mean, stats.invstd, 0.0)


def _fused_backward_reduce(dy: Tensor, x: Tensor, saved: Saved) -> tuple[Tensor, Tensor]:
    sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
        dy, x, saved.mean, saved.invstd, saved.weight, True, False, False
    )
    return sum_dy, sum_dy_xmu


def _fused_backward_elemt(dy: Tensor, x: Tensor, saved: Saved, sums: Tensor) -> Tensor:
    # sums = [sum_dy - r invstd^2 sum_dy_xmu, sum_dy_xmu about m]: the kernel's (x - m32) form (_function).
    assert saved.int_count is not None
    return torch.batch_norm_backward_elemt(
        dy, x, saved.mean, saved.invstd, saved.weight, sums[0], sums[1], saved.int_count
    )


FUSED = Backend("fused", _fused_local_moments, _fused_pack, _fused_normalize, _fused_backward_reduce,
                _fused_backward_elemt)


def finish_statistics(
    backend: Backend, summed: Tensor, local: _stats.LocalMoments, shift: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, dtype: torch.dtype, running_mean: Optional[Tensor],
    running_var: Optional[Tensor], momentum: float | Tensor, triton: bool = True, guard_empty: bool = False,
) -> _stats.PerChannel:
    """The step's per-channel values from the summed buffer; updates the running statistics.

    ``shift``: the shift the buffer was packed about (``_stats.finish_statistics``);
    ``running_mean``/``running_var`` None: no update (also when the global batch is empty);
    ``guard_empty``: the global count may be zero and cannot be read on the host (CUDA graph capture):
    the running statistics keep their values then (the Triton kernel always guards). One Triton
    kernel where it runs (``triton`` False: always aten, e.g. while dynamo traces), else ``_stats``'
    aten ops.
    """
    native = backend is NATIVE
    about = local.shift if native else None
    if triton and _triton.usable(summed.device) and not isinstance(momentum, Tensor):  # eager: a float factor
        return _triton.finish_statistics(summed, shift, about, weight, bias, eps, dtype, running_mean, running_var,
                                         momentum, local.shift.numel())
    stats = _stats.finish_statistics(summed, shift, about, weight, bias, eps, dtype,
                                     coefficients=native, int_count=not native)
    if running_mean is not None and running_var is not None:
        _stats.update_running_statistics(running_mean, running_var, stats, momentum, guard_empty=guard_empty)
    return stats


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
    if key in _HAS_FUSED_OPS:
        return []
    missing = [op for op in FUSED_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)]
    if not missing:
        _HAS_FUSED_OPS.add(key)
    return missing


# Dispatch keys found to have every fused kernel (four dispatcher queries, a few us each, per step
# otherwise). Only positive answers are kept: kernels get registered (CPU stand-ins in tests), not removed.
_HAS_FUSED_OPS: set[str] = set()


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
