"""CPU stand-ins for torch's CUDA-only SyncBatchNorm kernels, so the ``fused`` backend runs and is tested on CPU.

``register()`` gives ``torch.batch_norm_stats``, ``batch_norm_elemt``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt`` and ``batch_norm_gather_stats_with_counts`` a Python kernel for the CPU
dispatch key (``torch.library``), written from the contracts of pytorch's
``aten/src/ATen/native/cuda/Normalization.cu``:

- statistics (mean, invstd, the gradient sums) in the accumulation type: float32 for
  float16/bfloat16/float32 input, float64 for float64; ``mean`` and ``invstd`` of one dtype;
- ``weight``/``bias`` of the input's dtype, or float32 with float16/bfloat16 input;
- ``batch_norm_backward_elemt``'s ``count`` an int32 tensor whose sum is the global count;
- element-wise results in the input's dtype and memory format (ATen's ``suggest_memory_format``),
  computed in the accumulation type.

A call the CUDA kernels would refuse raises here too. The arithmetic is the kernels' formulas in
the accumulation type (the reductions are torch's CPU sums, not CUDA's Welford trees), so a
result may differ from a GPU's in the last bits, never in what it means.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LIBRARY: Optional[torch.library.Library] = None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _nd(t: Tensor, x: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _check_input(name: str, x: Tensor) -> None:
    if x.dtype not in _FLOATING:
        raise RuntimeError(f"\"{name}\" not implemented for '{x.dtype}'")
    if x.dim() < 2:
        raise RuntimeError(f"{name}: expected input of at least 2 dimensions, got {x.dim()}")


def _check_stats(name: str, x: Tensor, mean: Tensor, invstd: Tensor) -> None:
    if mean.dtype != invstd.dtype:
        raise RuntimeError("mean and invstd need to have the same data types")
    if mean.dtype not in (x.dtype, _acc(x.dtype)):
        raise RuntimeError(f"{name}: mean of dtype {mean.dtype} for input of dtype {x.dtype}")
    if mean.shape != (x.shape[1],) or invstd.shape != (x.shape[1],):
        raise RuntimeError(f"{name}: mean/invstd of shape {tuple(mean.shape)} for {x.shape[1]} channels")


def _check_parameter(name: str, x: Tensor, p: Optional[Tensor], what: str) -> None:
    if p is None:
        return
    mixed = x.dtype in (torch.float16, torch.bfloat16) and p.dtype == torch.float32
    if p.dtype != x.dtype and not mixed:
        raise RuntimeError(
            f"{name}: {what} of dtype {p.dtype} with input of dtype {x.dtype}; expected the input's dtype, or "
            "float32 with float16/bfloat16 input"
        )
    if p.shape != (x.shape[1],):
        raise RuntimeError(f"{name}: {what} of shape {tuple(p.shape)} for {x.shape[1]} channels")


def _suggest_memory_format(x: Tensor) -> torch.memory_format:
    """ATen's ``suggest_memory_format``: channels-last when ``x`` is dense in that order and not channels-first."""
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dim and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
            return fmt
    return torch.contiguous_format


def _like_input(result: Tensor, x: Tensor) -> Tensor:
    out = torch.empty_like(x, memory_format=_suggest_memory_format(x))
    return out.copy_(result)


def batch_norm_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_input("batch_norm_stats", x)
    acc = _acc(x.dtype)
    # CUDA's Welford kernel: a mean accumulated in the accumulation type (so rounded, and more when
    # |mean| is large), and the variance about the exact running mean, not about the rounded one.
    mean = x.to(acc).mean(_dims(x))
    var = x.to(torch.float64).var(_dims(x), correction=0).to(acc)
    return mean, (var + eps).rsqrt()


def batch_norm_elemt(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
                     eps: float) -> Tensor:
    _check_input("batch_norm_elemt", x)
    _check_stats("batch_norm_elemt", x, mean, invstd)
    _check_parameter("batch_norm_elemt", x, weight, "weight")
    _check_parameter("batch_norm_elemt", x, bias, "bias")
    acc = _acc(x.dtype)
    y = (x.to(acc) - _nd(mean.to(acc), x)) * _nd(invstd.to(acc), x)
    if weight is not None:
        y = y * _nd(weight.to(acc), x)
    if bias is not None:
        y = y + _nd(bias.to(acc), x)
    return _like_input(y, x)


def batch_norm_backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                               input_g: bool, weight_g: bool, bias_g: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_input("batch_norm_backward_reduce", x)
    _check_stats("batch_norm_backward_reduce", x, mean, invstd)
    _check_parameter("batch_norm_backward_reduce", x, weight, "weight")
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise RuntimeError("batch_norm_backward_reduce: grad_output must have the input's shape and dtype")
    acc = _acc(x.dtype)
    dya = dy.to(acc)
    xmu = x.to(acc) - _nd(mean.to(acc), x)
    sum_dy = dya.sum(_dims(x)).to(mean.dtype)
    sum_dy_xmu = (dya * xmu).sum(_dims(x)).to(mean.dtype)
    param_dtype = mean.dtype if weight is None else weight.dtype
    empty = torch.empty(0, dtype=mean.dtype)
    return (
        sum_dy if input_g else empty,
        sum_dy_xmu if input_g else empty.clone(),
        (sum_dy_xmu * invstd).to(param_dtype) if weight_g else empty.clone(),
        sum_dy.to(param_dtype) if bias_g else empty.clone(),
    )


def batch_norm_backward_elemt(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                              sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor) -> Tensor:
    _check_input("batch_norm_backward_elemt", x)
    _check_stats("batch_norm_backward_elemt", x, mean, invstd)
    _check_parameter("batch_norm_backward_elemt", x, weight, "weight")
    if count.dtype != torch.int32:
        raise RuntimeError(f"batch_norm_backward_elemt: count must be an int32 tensor, got {count.dtype}")
    acc = _acc(x.dtype)
    norm = 1.0 / count.to(torch.float64).sum().to(acc)
    invstd_a = invstd.to(acc)
    factor_1 = _nd(invstd_a * invstd_a * sum_dy_xmu.to(acc) * norm, x)
    factor_2 = _nd(invstd_a if weight is None else weight.to(acc) * invstd_a, x)
    mean_dy = _nd(sum_dy.to(acc) * norm, x)
    grad = (dy.to(acc) - mean_dy - (x.to(acc) - _nd(mean.to(acc), x)) * factor_1) * factor_2
    return _like_input(grad, x)


def batch_norm_gather_stats_with_counts(x: Tensor, mean: Tensor, invstd: Tensor, running_mean: Optional[Tensor],
                                        running_var: Optional[Tensor], momentum: float, eps: float,
                                        counts: Tensor) -> tuple[Tensor, Tensor]:
    _check_input("batch_norm_gather_stats_with_counts", x)
    acc = _acc(running_mean.dtype if running_mean is not None else x.dtype)
    n = counts.to(acc).view(-1, 1)
    means, invstds = mean.to(acc), invstd.to(acc)
    total = n.sum(0)
    global_mean = (n * means).sum(0) / total
    variances = invstds.pow(-2) - eps
    m2 = (n * (variances + (means - global_mean).square())).sum(0)
    var = m2 / total
    if running_mean is not None:
        running_mean.copy_(momentum * global_mean + (1 - momentum) * running_mean.to(acc))
    if running_var is not None:
        running_var.copy_(momentum * var * total / (total - 1) + (1 - momentum) * running_var.to(acc))
    return global_mean, (var + eps).rsqrt()


_OPS = {
    "batch_norm_stats": batch_norm_stats,
    "batch_norm_elemt": batch_norm_elemt,
    "batch_norm_backward_reduce": batch_norm_backward_reduce,
    "batch_norm_backward_elemt": batch_norm_backward_elemt,
    "batch_norm_gather_stats_with_counts": batch_norm_gather_stats_with_counts,
}


def register() -> None:
    """Register the stand-ins for the CPU dispatch key, once per process."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("aten", "IMPL")
    for name, fn in _OPS.items():
        library.impl(name, fn, "CPU")
    _LIBRARY = library
