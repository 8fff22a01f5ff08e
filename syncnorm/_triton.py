"""The per-channel prologue and epilogue of a training step as one Triton kernel each.

Between the heavy kernels (local statistics, normalisation) a step does ~25 small per-channel
operations: pack the local moments about a shift common to all ranks into the float64 buffer, and
after the all-reduce turn the summed buffer into the mean, invstd, the normalisation and backward
coefficients and the running statistics (``_stats.pack_moments`` and
``_stats.finish_statistics`` with aten ops: one launch each on a GPU). Here each side is ONE kernel.
An eager step launches it directly; torch.compile traces it as a ``torch.library`` custom op
(``syncnorm::pack_moments``, ``syncnorm::pack_welford_moments``, ``syncnorm::finish_statistics``), with a
fake implementation.

Where they run: CUDA tensors when Triton is installed (it ships with torch's CUDA builds), and CPU
tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter; the tests use it to run these kernels
without a GPU). Elsewhere ``usable`` is False and callers use the aten ops. Both compute in float64
and round once; the tests compare them.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import Any, Optional

import torch
from torch import Tensor

from . import _stats

_ROWS = 8  # rows of finish_statistics' block: mean, invstd, residual, r_invstd2, alpha, beta, coef (2)


@functools.cache
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def usable(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``: CUDA with Triton, or CPU under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return _triton_installed()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _triton_installed()


def _float_bits(value: float) -> int:
    """A Python float as the int64 of its float64 bits: Triton passes float arguments as float32."""
    return int(struct.unpack("<q", struct.pack("<d", float(value)))[0])


@functools.cache
def _kernels(interpret: bool) -> Any:
    """The jitted kernels; ``triton.jit`` decides at decoration time whether they are interpreted."""
    import triton
    import triton.language as tl

    # Scalars are never specialised: Triton would turn a count or channel number of 1 into a constant.
    @triton.jit(do_not_specialize=["n", "tiny_eps_bits", "channels"])
    def pack_kernel(shift_ptr, a_ptr, b_ptr, common_ptr, out_ptr, n, tiny_eps_bits, channels,
                    WELFORD: tl.constexpr, HAS_COMMON: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < channels
        nf = n.to(tl.float64)
        c = tl.load(shift_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        a = tl.load(a_ptr + offs, mask=mask, other=1.0).to(tl.float64)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        if WELFORD:
            # a = invstd (with a negligible eps), b = sum x (x - c): see _backends._fused_local_moments.
            tiny_eps = tiny_eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
            var = 1.0 / (a * a) - tiny_eps
            var = tl.where(var < 0.0, 0.0, var)  # not tl.maximum: a NaN variance must stay NaN (as aten's clamp)
            large = tl.abs(c) > tl.sqrt(var)
            sum_dev = tl.where(large, (b - var * nf) / tl.where(large, c, 1.0), 0.0)
            sum_sq_dev = var * nf + sum_dev * sum_dev / nf
        else:
            sum_dev = a
            sum_sq_dev = b
        # The sums about the common shift (zero without one): [n, moved (C), squares (C)].
        delta = c
        if HAS_COMMON:
            delta = c - tl.load(common_ptr + offs, mask=mask, other=0.0)
        moved = sum_dev + nf * delta
        tl.store(out_ptr + 1 + offs, moved, mask=mask)
        tl.store(out_ptr + 1 + channels + offs, sum_sq_dev + delta * (sum_dev + moved), mask=mask)
        if pid == 0:
            tl.store(out_ptr, nf)

    @triton.jit(do_not_specialize=["momentum_bits", "eps_bits", "channels"])
    def finish_kernel(summed_ptr, shift_ptr, about_ptr, weight_ptr, bias_ptr, rm_ptr, rv_ptr, out_ptr, count_ptr,
                      momentum_bits, eps_bits, channels,
                      HAS_SHIFT: tl.constexpr, HAS_ABOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, UPDATE_RUNNING: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < channels
        eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
        n = tl.load(summed_ptr)
        mean = tl.load(summed_ptr + 1 + offs, mask=mask, other=0.0) / n
        var = tl.load(summed_ptr + 1 + channels + offs, mask=mask, other=0.0) / n - mean * mean
        var = tl.where(var < 0.0, 0.0, var)  # not tl.maximum, which turns NaN into 0
        if HAS_SHIFT:
            mean += tl.load(shift_ptr + offs, mask=mask, other=0.0)
        mean_s = mean.to(out_ptr.dtype.element_ty)
        residual = mean - mean_s.to(tl.float64)
        invstd = 1.0 / tl.sqrt(var + eps)
        alpha = invstd
        if HAS_WEIGHT:
            alpha = invstd * tl.load(weight_ptr + offs, mask=mask, other=1.0).to(tl.float64)
        offset = residual
        if HAS_ABOUT:
            offset = mean - tl.load(about_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        beta = -offset * alpha
        if HAS_BIAS:
            beta += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        invstd2 = invstd * invstd
        coef = -alpha / n
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + offs, mean_s, mask=mask)
        tl.store(out_ptr + channels + offs, invstd.to(dtype), mask=mask)
        tl.store(out_ptr + 2 * channels + offs, residual.to(dtype), mask=mask)
        tl.store(out_ptr + 3 * channels + offs, (residual * invstd2).to(dtype), mask=mask)
        tl.store(out_ptr + 4 * channels + offs, alpha.to(dtype), mask=mask)
        tl.store(out_ptr + 5 * channels + offs, beta.to(dtype), mask=mask)
        tl.store(out_ptr + 6 * channels + offs, coef.to(dtype), mask=mask)
        tl.store(out_ptr + 7 * channels + offs, (coef * invstd2).to(dtype), mask=mask)
        if UPDATE_RUNNING:
            momentum = momentum_bits.to(tl.int64).to(tl.float64, bitcast=True)
            running_mean = tl.load(rm_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            running_var = tl.load(rv_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            unbiased = var * (n / (n - 1.0))
            # An empty global batch (NaN statistics) leaves the buffers as they were: callers skip the update
            # when they can read the count, and a CUDA graph being captured cannot (_function.capturing).
            keep = n > 0.0
            new_mean = tl.where(keep, running_mean + momentum * (mean - running_mean), running_mean)
            new_var = tl.where(keep, running_var + momentum * (unbiased - running_var), running_var)
            tl.store(rm_ptr + offs, new_mean.to(rm_ptr.dtype.element_ty), mask=mask)
            tl.store(rv_ptr + offs, new_var.to(rv_ptr.dtype.element_ty), mask=mask)
        if pid == 0:
            tl.store(count_ptr, n.to(tl.int32))

    return pack_kernel, finish_kernel


def _launch(kernel_index: int, channels: int, *args: Any, **constexprs: Any) -> None:
    block, grid = _block_and_grid(channels)
    kernel = _kernels(os.environ.get("TRITON_INTERPRET") == "1")[kernel_index]
    kernel[grid](*args, BLOCK=block, **constexprs)


@functools.lru_cache(maxsize=256)
def _block_and_grid(channels: int) -> tuple[int, tuple[int]]:
    """The block size and grid of a launch over ``channels`` (cached: triton's helpers cost a few us a call)."""
    block = min(1024, 1 << max(channels - 1, 0).bit_length())
    return block, ((channels + block - 1) // block,)


def _pack(shift: Tensor, a: Tensor, b: Tensor, num_values: int, common: Optional[Tensor], welford: bool,
          tiny_eps: float) -> Tensor:
    channels = shift.numel()
    packed = torch.empty(1 + 2 * channels, dtype=torch.float64, device=shift.device)
    with torch.cuda.device(shift.device) if shift.is_cuda else _no_context():
        _launch(0, channels, shift, a, b, shift if common is None else common, packed, num_values,
                _float_bits(tiny_eps), channels, WELFORD=welford, HAS_COMMON=common is not None)
    return packed


class _no_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: Any) -> None:
        return None


@torch.library.custom_op("syncnorm::pack_moments", mutates_args=())
def _pack_moments_op(shift: Tensor, sum_dev: Tensor, sum_sq_dev: Tensor, num_values: int,
                     common: Optional[Tensor]) -> Tensor:
    return _pack(shift, sum_dev, sum_sq_dev, num_values, common, False, 0.0)


@torch.library.custom_op("syncnorm::pack_welford_moments", mutates_args=())
def _pack_welford_op(mean: Tensor, invstd: Tensor, moment: Tensor, num_values: int, common: Optional[Tensor],
                     tiny_eps: float) -> Tensor:
    return _pack(mean, invstd, moment, num_values, common, True, tiny_eps)


@_pack_moments_op.register_fake
def _(shift: Tensor, sum_dev: Tensor, sum_sq_dev: Tensor, num_values: int, common: Optional[Tensor]) -> Tensor:
    return shift.new_empty(1 + 2 * shift.numel(), dtype=torch.float64)


@_pack_welford_op.register_fake
def _(mean: Tensor, invstd: Tensor, moment: Tensor, num_values: int, common: Optional[Tensor],
      tiny_eps: float) -> Tensor:
    return mean.new_empty(1 + 2 * mean.numel(), dtype=torch.float64)


@torch.library.custom_op("syncnorm::finish_statistics", mutates_args=("running_mean", "running_var"))
def _finish_op(summed: Tensor, shift: Optional[Tensor], about: Optional[Tensor], weight: Optional[Tensor],
               bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
               momentum: float, eps: float, dtype: torch.dtype, channels: int) -> tuple[Tensor, Tensor]:
    return _finish(summed, shift, about, weight, bias, running_mean, running_var, momentum, eps, dtype, channels)


def _finish(summed: Tensor, shift: Optional[Tensor], about: Optional[Tensor], weight: Optional[Tensor],
            bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
            momentum: float, eps: float, dtype: torch.dtype, channels: int) -> tuple[Tensor, Tensor]:
    block = summed.new_empty(_ROWS, channels, dtype=dtype)
    count = summed.new_empty(1, dtype=torch.int32)
    update_running = running_mean is not None and running_var is not None
    with torch.cuda.device(summed.device) if summed.is_cuda else _no_context():
        _launch(1, channels, summed, summed if shift is None else shift, summed if about is None else about,
                summed if weight is None else weight, summed if bias is None else bias,
                running_mean if update_running else summed, running_var if update_running else summed, block, count,
                _float_bits(momentum), _float_bits(eps), channels,
                HAS_SHIFT=shift is not None, HAS_ABOUT=about is not None, HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None, UPDATE_RUNNING=update_running)
    return block, count


@_finish_op.register_fake
def _(summed: Tensor, shift: Optional[Tensor], about: Optional[Tensor], weight: Optional[Tensor],
      bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
      momentum: float, eps: float, dtype: torch.dtype, channels: int) -> tuple[Tensor, Tensor]:
    return summed.new_empty(_ROWS, channels, dtype=dtype), summed.new_empty(1, dtype=torch.int32)


# Eager calls launch the kernels directly; the custom ops (one dispatched op each, with a fake
# implementation) are what torch.compile traces. Their eager wrapper costs more host time than the launch.


def pack_moments(local: _stats.LocalMoments, common: Optional[Tensor]) -> Tensor:
    """``_stats.pack_moments`` in one kernel (``common``: the shift common to all ranks, (C,), or None: zero)."""
    if torch.compiler.is_compiling():
        return torch.ops.syncnorm.pack_moments(local.shift, local.sum_dev, local.sum_sq_dev, local.num_values, common)
    return _pack(local.shift, local.sum_dev, local.sum_sq_dev, local.num_values, common, False, 0.0)


def pack_welford_moments(mean: Tensor, invstd: Tensor, moment: Tensor, num_values: int, common: Optional[Tensor],
                         tiny_eps: float) -> Tensor:
    """The packed buffer from ``batch_norm_stats``' mean and invstd and ``sum x (x - mean)``, in one kernel."""
    if torch.compiler.is_compiling():
        return torch.ops.syncnorm.pack_welford_moments(mean, invstd, moment, num_values, common, tiny_eps)
    return _pack(mean, invstd, moment, num_values, common, True, tiny_eps)


def finish_statistics(
    summed: Tensor, shift: Optional[Tensor], about: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, dtype: torch.dtype, running_mean: Optional[Tensor],
    running_var: Optional[Tensor], momentum: float, channels: int,
) -> _stats.PerChannel:
    """``_stats.finish_statistics`` and ``_stats.update_running_statistics`` in one kernel."""
    finish = torch.ops.syncnorm.finish_statistics if torch.compiler.is_compiling() else _finish
    block, count = finish(summed, shift, about, weight, bias, running_mean, running_var, momentum, eps, dtype, channels)
    mean, invstd, residual, r_invstd2, alpha, beta = block[:6]
    return _stats.PerChannel(summed[0], mean, invstd, residual, r_invstd2, alpha, beta, block[6:], count, None)
