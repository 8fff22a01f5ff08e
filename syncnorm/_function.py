"""The autograd Function of a synchronised BatchNorm in training mode.

Reads like shared/DESIGN-NOTES.md section 1. Forward: local moments, ONE all-reduce of a
(2C+1)-value float64 buffer, normalise with the global statistics. Backward: local gradient
sums, ONE all-reduce of the 2C sums, then the input gradient with the global sums.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import _comm, _kernels, _stats


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the batch of every rank of ``group``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        eps: float,
        momentum: float,
        group: _comm.ProcessGroup,
        layer: str,
    ) -> Tensor:
        x = _kernels.keep_layout(x)
        stats_dtype = _stats.statistics_dtype(x)
        local_count = _stats.values_per_channel(x)

        # The output buffer first holds the deviations of the local moments, then the output: one
        # activation-sized allocation per forward, as in local BatchNorm (fresh pages are costly).
        output = torch.empty_like(x) if not x.is_cuda and x.dtype == stats_dtype else None
        packed = _stats.pack_moments(_stats.local_moments(x, scratch=output))
        _comm.all_reduce_sum(packed, group, layer, "batch statistics")
        total = _stats.unpack_moments(packed)
        # Only a rank with at most one local value can be part of a global count <= 1, so the
        # others skip the host sync. Every rank of such a batch takes the same branch: a global
        # count of 1 raises on all of them, and none is left waiting in a collective.
        global_batch_is_empty = False
        if local_count <= 1:
            global_batch_is_empty = _check_global_count(total, x, layer)

        mean = total.mean.to(stats_dtype)
        var = total.var.to(stats_dtype)
        invstd = total.var.add(eps).rsqrt_().to(stats_dtype)
        # An all-empty global batch leaves the running statistics as they were, as BatchNorm does.
        if running_mean is not None and running_var is not None and not global_batch_is_empty:
            _update_running_stats(running_mean, running_var, total, momentum)

        weight_s = None if weight is None else weight.to(stats_dtype)
        bias_s = None if bias is None else bias.to(stats_dtype)
        ctx.save_for_backward(x, weight_s, mean, var, invstd)
        ctx.count = total.num_values
        ctx.eps = eps
        ctx.group = group
        ctx.layer = layer
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return _kernels.normalize(x, weight_s, bias_s, mean, var, invstd, eps, out=output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, mean, var, invstd = ctx.saved_tensors
        dy = _kernels.like_layout(grad_output, x)
        input_needs_grad, weight_needs_grad, bias_needs_grad = ctx.needs_input_grad[:3]

        sums = _kernels.backward_reduce(
            dy, x, mean, var, invstd, ctx.eps, weight, weight_needs_grad, bias_needs_grad
        )
        grad_x = None
        # needs_input_grad is the same on every rank of an identical model, so either every
        # rank takes this all-reduce or none does.
        if input_needs_grad:
            global_sums = torch.cat([sums.sum_dy, sums.sum_dy_xmu])
            _comm.all_reduce_sum(global_sums, ctx.group, ctx.layer, "gradient sums")
            sum_dy, sum_dy_xmu = global_sums.chunk(2)
            grad_x = _kernels.backward_elemt(
                dy, x, mean, var, invstd, ctx.eps, weight, sum_dy, sum_dy_xmu, ctx.count
            )

        weight_dtype, bias_dtype = ctx.param_dtypes
        grad_weight = _to(sums.grad_weight, weight_dtype) if weight_needs_grad else None
        grad_bias = _to(sums.grad_bias, bias_dtype) if bias_needs_grad else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def _to(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return None if t is None or dtype is None else t.to(dtype)


def _check_global_count(total: _stats.GlobalMoments, x: Tensor, layer: str) -> bool:
    """Raise torch's error for a global batch of one value per channel; True when it is empty."""
    count = int(total.num_values.item())
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()} on this "
            f"rank and 1 value per channel over the whole process group ({layer}). Use a larger "
            "global batch, or eval() mode for single samples."
        )
    return count == 0


def _update_running_stats(
    running_mean: Tensor, running_var: Tensor, total: _stats.GlobalMoments, momentum: float
) -> None:
    """Exponential (or, with momentum=None, cumulative) average of the GLOBAL statistics, in place."""
    with torch.no_grad():
        running_mean.copy_(running_mean.double().lerp_(total.mean, momentum))
        running_var.copy_(running_var.double().lerp_(_stats.unbiased_var(total), momentum))
