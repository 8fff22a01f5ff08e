"""The synchronised training BatchNorm in a form torch.compile traces whole (fullgraph=True).

Used only while dynamo traces (``torch.compiler.is_compiling()``); eager code never comes here, so
eager op counts and speed are those of ``_function.SyncBatchNormFunction``. The math is the eager
Function's own, shared with it: ``_function.merged_statistics`` (the backend's local moments and
their packed float64 sums), ``_backends.finish_statistics`` (aten ops here),
``_function.saved_for_backward`` and ``_function.backward_gradients``, with the backend ``_backends.choose`` picks
(``SYNCNORM_KERNELS``). What differs is only what dynamo needs:

- the collective is ``torch.distributed._functional_collectives.all_reduce`` on a group referred to
  by its name (a ``str``): it traces as ``_c10d_functional.all_reduce`` + ``wait_tensor`` in the FX
  graph, where a ProcessGroup object passed to an autograd.Function would break the graph;
- the global-count check is the custom op ``syncnorm::check_global_count`` (the eager check, with its
  ``ValueError`` and its one host sync), emitted only where the *static* local shape has at most one
  value per channel, as eager does it only there (only such a rank can be part of a global batch of one
  value per channel); ordinary layers carry no check and no host synchronisation;
- no side effects inside the Function: it returns the global count, mean and variance as
  non-differentiable outputs, and the running statistics are updated by in-place ops on the
  buffers after it (AOTAutograd functionalises them and writes them back at the end of the graph);
  the momentum may be a 0-dim tensor (``momentum=None``: ``1 / num_batches_tracked`` without ``.item()``).

``SyncBatchNormAct`` traces the same way (``sync_batch_norm_act``), with ``activation.backward_gradients``
as its backward; its data-dependent choice of the channels that keep their input is the custom op
``syncnorm::act_fallback_channels``, whose fake returns an index of unbacked size (dynamo needs that size
in an output of the Function: the index is returned too, and dropped).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _backends, _function, _kernels, _stats

Momentum = Union[float, Tensor]


def _all_reduce_sum(buffer: Tensor, group_name: Optional[str]) -> Tensor:
    """The sum of ``buffer`` over the ranks of the group called ``group_name`` (a new tensor); None: no group."""
    if group_name is None:
        return buffer
    from torch.distributed import _functional_collectives as funcol

    # wait_tensor makes the result an ordinary tensor in eager (funcol returns an AsyncCollectiveTensor).
    return funcol.wait_tensor(funcol.all_reduce(buffer, "sum", group_name))  # type: ignore[arg-type]


def _missing_fused_ops(device: torch.device) -> tuple[str, ...]:
    return _missing_fused_ops_on(device.type)


@torch.compiler.assume_constant_result
def _missing_fused_ops_on(device_type: str) -> tuple[str, ...]:
    """``_backends.missing_fused_ops`` as a constant of the trace (dynamo cannot trace its dispatcher query)."""
    return tuple(_backends.missing_fused_ops(torch.device(device_type)))


@torch.library.custom_op("syncnorm::check_global_count", mutates_args=())
def _checked_global_count(summed: Tensor, local_size: str, layer: str) -> Tensor:
    """``summed`` (a copy) after the eager check of its global count: ``ValueError`` for one value per channel.

    A custom op, so that the graph keeps it (its output feeds the statistics) and runs the eager check.
    """
    _function.check_global_count(summed, local_size, layer)
    return summed.clone()


@_checked_global_count.register_fake
def _(summed: Tensor, local_size: str, layer: str) -> Tensor:
    return torch.empty_like(summed)


class TraceableSyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the batch of every rank of the group ``group_name``.

    Returns the output and, as non-differentiable outputs, the global count (float64 scalar) and the
    float64 global mean and biased variance ((2, C)) from which the caller updates the running statistics.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        group_name: Optional[str],
        layer: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        backend = _backends.choose(x, _missing_fused_ops)
        x = _kernels.keep_layout(x)
        local, summed, shift = _function.merged_statistics(
            x, backend, lambda packed: _all_reduce_sum(packed, group_name)
        )
        if _stats.values_per_channel(x) <= 1:
            # A static fact of this rank's shape: the other ranks may have more values, so the check is
            # on the global count (every rank checks the same summed value, so all raise or none does).
            summed = _checked_global_count(summed, str(x.size()), layer)
        # aten ops only (inductor fuses them), no state written inside the Function.
        stats = _backends.finish_statistics(backend, summed, local, shift, weight, bias, eps,
                                            _stats.statistics_dtype(x), None, None, 0.0, triton=False)
        saved = _function.saved_for_backward(x, stats, local, weight)
        output = backend.normalize(x, local, stats, weight)
        ctx.save_for_backward(x, *saved)
        ctx.backend = backend
        ctx.group_name = group_name
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        assert stats.moments is not None  # aten ops: the float64 moments for the running update
        count, moments = stats.num_values.clone(), stats.moments.clone()
        ctx.mark_non_differentiable(count, moments)
        return output, count, moments

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
        x, *saved = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _function.backward_gradients(
            ctx.backend, x, _backends.Saved(*saved), grad_output,
            ctx.needs_input_grad[:3], lambda sums: _all_reduce_sum(sums, ctx.group_name),
        )
        weight_dtype, bias_dtype = ctx.param_dtypes
        return grad_x, _to(grad_weight, weight_dtype), _to(grad_bias, bias_dtype), None, None, None


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
    layer: str = "syncnorm.sync_batch_norm",
) -> Tensor:
    """Training-mode batch norm over the group ``group_name`` (None: this rank alone), traceable whole.

    The same collectives as the eager Function: one all-reduce of ``2C + 1`` values, two for float64 input.
    """
    output, count, moments = TraceableSyncBatchNormFunction.apply(input, weight, bias, eps, group_name, layer)
    if running_mean is not None and running_var is not None:
        _update_running_stats(running_mean, running_var, count, moments, momentum, input)
    return output


def _update_running_stats(running_mean: Tensor, running_var: Tensor, count: Tensor, moments: Tensor,
                          momentum: Momentum, input: Tensor) -> None:
    """The eager step's running update (``_stats.update_running``), in place on the buffers (traced as buffer
    mutations). Only a rank with no values can see an all-empty global batch, which leaves them as they were."""
    with torch.no_grad():
        _stats.update_running(running_mean, running_var, count, moments, momentum,
                              guard_empty=_stats.values_per_channel(input) == 0)


def group_name(group: Any) -> Optional[str]:
    """The registered name of a ProcessGroup (what functional collectives take), None for no group."""
    return None if group is None else str(group.group_name)


@torch.library.custom_op("syncnorm::act_fallback_channels", mutates_args=())
def _act_fallback_index(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: str,
                        negative_slope: float, alpha: float, dtype: torch.dtype) -> Tensor:
    """``SyncBatchNormAct``'s choice of the channels that keep their input (``activation.fallback_index``).

    A custom op whose fake returns an index of unbacked size: the choice is data-dependent (a nonzero, one
    host sync), and so stays inside the graph instead of breaking it.
    """
    from . import activation as act

    return act.fallback_index(y, weight, bias, act._Activation(activation, negative_slope, alpha), dtype)


@_act_fallback_index.register_fake
def _(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: str, negative_slope: float,
      alpha: float, dtype: torch.dtype) -> Tensor:
    return y.new_empty((torch.library.get_ctx().new_dynamic_size(max=y.shape[1]),), dtype=torch.long)


class TraceableSyncBatchNormActFunction(torch.autograd.Function):
    """``SyncBatchNormActFunction`` in the traceable form of ``TraceableSyncBatchNormFunction`` (same outputs)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        group_name: Optional[str],
        layer: str,
        activation: str,
        negative_slope: float,
        alpha: float,
        keep: bool,
    ) -> tuple[Tensor, ...]:
        from . import activation as act

        backend = _backends.choose(x, _missing_fused_ops)
        x = _kernels.keep_layout(x)
        local, summed, shift = _function.merged_statistics(
            x, backend, lambda packed: _all_reduce_sum(packed, group_name)
        )
        if _stats.values_per_channel(x) <= 1:  # as TraceableSyncBatchNormFunction
            summed = _checked_global_count(summed, str(x.size()), layer)
        stats_dtype = _stats.statistics_dtype(x)
        stats = _backends.finish_statistics(backend, summed, local, shift, weight, bias, eps, stats_dtype,
                                            None, None, 0.0, triton=False)
        function = act._Activation(activation, negative_slope, alpha)
        y = function.forward_(backend.normalize(x, local, stats, weight))
        fallback = kept = None
        if keep:  # an index of unbacked size, possibly empty: the backward takes the same ops either way
            fallback = _act_fallback_index(y, None if weight is None else weight.detach(),
                                          None if bias is None else bias.detach(), activation, negative_slope,
                                          alpha, stats_dtype)
            kept = x.index_select(1, fallback)
        ctx.save_for_backward(*act.saved_for_backward(y, weight, bias, stats, stats_dtype), fallback, kept)
        ctx.backend = backend
        ctx.group_name = group_name
        ctx.activation = function
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.input_dtype = x.dtype
        assert stats.moments is not None  # aten ops: the float64 moments for the running update
        count, moments = stats.num_values.clone(), stats.moments.clone()
        if fallback is None:
            ctx.mark_non_differentiable(count, moments)
            return y, count, moments
        # The index is an output too: dynamo needs the unbacked size the custom op creates in an output of
        # the Function (it is not differentiable, and the caller drops it).
        fallback = fallback.clone()
        ctx.mark_non_differentiable(count, moments, fallback)
        return y, count, moments, fallback

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
        from . import activation as act

        grad_x, grad_weight, grad_bias = act.backward_gradients(
            ctx.backend, ctx.activation, ctx.saved_tensors, grad_output, ctx.needs_input_grad[:3],
            lambda sums: _all_reduce_sum(sums, ctx.group_name),
        )
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (None if grad_x is None else grad_x.to(ctx.input_dtype), _to(grad_weight, weight_dtype),
                _to(grad_bias, bias_dtype), None, None, None, None, None, None, None)


def sync_batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Momentum,
    eps: float,
    group_name: Optional[str],
    layer: str,
    activation: str,
    negative_slope: float,
    alpha: float,
    keep: bool,
) -> Tensor:
    """``sync_batch_norm`` followed by ``SyncBatchNormAct``'s activation, keeping its output (traceable whole).

    ``keep``: whether a backward may follow (choose the channels that keep their input).
    """
    output, count, moments, *_ = TraceableSyncBatchNormActFunction.apply(
        input, weight, bias, eps, group_name, layer, activation, negative_slope, alpha, keep)
    if running_mean is not None and running_var is not None:
        _update_running_stats(running_mean, running_var, count, moments, momentum, input)
    return output
