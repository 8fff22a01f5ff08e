"""Prototype: the synchronised training BatchNorm in a form torch.compile traces whole (fullgraph=True).

Used only while dynamo traces (``torch.compiler.is_compiling()``); eager code never comes here, so
eager op counts and speed are those of ``_function.SyncBatchNormFunction``. The math is syncnorm's
own (``_stats`` for the local moments and their float64 merge, ``_kernels`` for the per-element
work); what differs is only what dynamo needs:

- the collective is ``torch.distributed._functional_collectives.all_reduce`` on a group referred to
  by its name (a ``str``): it traces as ``_c10d_functional.all_reduce`` + ``wait_tensor`` in the FX
  graph, where a ProcessGroup object passed to an autograd.Function would break the graph;
- no host synchronisation: the global-count check is a tensor assertion (``torch._assert_async``),
  emitted only where the *static* local shape has at most one value per channel (only such a rank
  can be part of a global batch of one value per channel), so ordinary layers carry no check;
- the running statistics are updated by in-place ops on the buffers after the Function, outside
  it (AOTAutograd functionalises them and writes the buffers back at the end of the graph); the
  momentum may be a 0-dim tensor (``momentum=None``: ``1 / num_batches_tracked`` without ``.item()``).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _kernels, _stats

Momentum = Union[float, Tensor]


def _all_reduce_sum(buffer: Tensor, group_name: Optional[str]) -> Tensor:
    """The sum of ``buffer`` over the ranks of the group called ``group_name`` (a new tensor); None: no group."""
    if group_name is None:
        return buffer
    from torch.distributed import _functional_collectives as funcol

    # wait_tensor makes the result an ordinary tensor in eager (funcol returns an AsyncCollectiveTensor).
    return funcol.wait_tensor(funcol.all_reduce(buffer, "sum", group_name))  # type: ignore[arg-type]


class TraceableSyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the batch of every rank of the group ``group_name``.

    Returns the output and, as non-differentiable outputs, the global count (float64 scalar), mean
    and biased variance (float64, (C,)) from which the caller updates the running statistics.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        group_name: Optional[str],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = _kernels.keep_layout(x)
        stats_dtype = _stats.statistics_dtype(x)
        # As in the eager Function: the output buffer first holds the deviations, then the output. It also
        # keeps the output from being a view (a channels-last result of _kernels.normalize is a view of a
        # (values, C) matrix), which a following in-place op (timm's ReLU(inplace=True)) must not see.
        output = torch.empty_like(x) if x.dtype == stats_dtype else None
        packed = _stats.pack_moments(_stats.local_moments(x, scratch=output))
        total = _stats.unpack_moments(_all_reduce_sum(packed, group_name))
        if _stats.values_per_channel(x) <= 1:
            # A static fact of this rank's shape: the other ranks may have more values, so the check
            # is on the global count, as a tensor (no .item(); every rank checks the same summed value).
            torch._assert_async(
                total.num_values != 1,
                "Expected more than 1 value per channel when training, got 1 value per channel over the "
                "whole process group (syncnorm, compiled). Use a larger global batch, or eval() mode.",
            )
        mean = total.mean.to(stats_dtype)
        var = total.var.to(stats_dtype)
        invstd = total.var.add(eps).rsqrt().to(stats_dtype)
        weight_s = None if weight is None else weight.to(stats_dtype)
        bias_s = None if bias is None else bias.to(stats_dtype)
        output = _kernels.normalize(x, weight_s, bias_s, mean, var, invstd, eps, out=output)
        ctx.save_for_backward(x, weight_s, mean, var, invstd, total.num_values)
        ctx.eps = eps
        ctx.group_name = group_name
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(total.num_values, total.mean, total.var)
        return output, total.num_values, total.mean, total.var

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
        x, weight, mean, var, invstd, count = ctx.saved_tensors
        dy = _kernels.like_layout(grad_output, x)
        input_needs_grad, weight_needs_grad, bias_needs_grad = ctx.needs_input_grad[:3]
        sums = _kernels.backward_reduce(dy, x, mean, var, invstd, ctx.eps, weight, weight_needs_grad, bias_needs_grad)
        grad_x = None
        if input_needs_grad:
            global_sums = _all_reduce_sum(torch.cat([sums.sum_dy, sums.sum_dy_xmu]), ctx.group_name)
            sum_dy, sum_dy_xmu = global_sums.chunk(2)
            grad_x = _kernels.backward_elemt(dy, x, mean, var, invstd, ctx.eps, weight, sum_dy, sum_dy_xmu, count)
        weight_dtype, bias_dtype = ctx.param_dtypes
        grad_weight = _to(sums.grad_weight, weight_dtype) if weight_needs_grad else None
        grad_bias = _to(sums.grad_bias, bias_dtype) if bias_needs_grad else None
        return grad_x, grad_weight, grad_bias, None, None


def _to(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return None if t is None or dtype is None else t.to(dtype)


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Momentum,
    eps: float,
    group_name: Optional[str],
) -> Tensor:
    """Training-mode batch norm over the group ``group_name`` (None: this rank alone), traceable whole."""
    output, count, mean, var = TraceableSyncBatchNormFunction.apply(input, weight, bias, eps, group_name)
    if running_mean is not None and running_var is not None:
        _update_running_stats(running_mean, running_var, count, mean, var, momentum, _stats.values_per_channel(input))
    return output


def _update_running_stats(
    running_mean: Tensor, running_var: Tensor, count: Tensor, mean: Tensor, var: Tensor, momentum: Momentum,
    local_count: int,
) -> None:
    """The same float64 average as the eager Function's, in place on the buffers (traced as buffer mutations)."""
    with torch.no_grad():
        unbiased = _stats.unbiased_var(_stats.GlobalMoments(count, mean, var))
        weight = momentum.double() if isinstance(momentum, Tensor) else momentum
        new_mean = running_mean.double().lerp(mean, weight)
        new_var = running_var.double().lerp(unbiased, weight)
        if local_count == 0:
            # Only a rank with no values can see an all-empty global batch; that leaves the statistics as they were.
            empty = count == 0
            new_mean = torch.where(empty, running_mean.double(), new_mean)
            new_var = torch.where(empty, running_var.double(), new_var)
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


def group_name(group: Any) -> Optional[str]:
    """The registered name of a ProcessGroup (what functional collectives take), None for no group."""
    return None if group is None else str(group.group_name)
