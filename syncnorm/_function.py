"""The autograd Function of a synchronised BatchNorm in training mode.

Forward: local moments, ONE all-reduce of a (2C+1)-value float64 buffer (count, and per channel the
sum and the sum of squares about zero; float64 input takes two: the global mean first, then the sums
about it), normalise with the global statistics. Backward: local gradient sums, ONE all-reduce of the
2C sums, then the input gradient with the global sums. Nothing is kept between steps: the results
are a function of the input, the parameters, the running-statistics buffers and the group. The
per-element work is the backend's (``_backends``: ``native`` or ``fused``), chosen once per call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _backends, _comm, _kernels, _stats
from ._errors import SyncNormError


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
        backend = _backends.choose(x)
        x = _kernels.keep_layout(x)
        local_count = _stats.values_per_channel(x)

        def all_reduce(packed: Tensor) -> Tensor:
            _comm.all_reduce_sum(packed, group, layer, "batch statistics")
            return packed

        local, summed, shift = merged_statistics(x, backend, all_reduce)
        # Only a rank with at most one local value can be part of a global count <= 1, so the
        # others skip the host sync. Every rank of such a batch takes the same branch: a global
        # count of 1 raises on all of them (before any state changes), and none is left waiting in a collective.
        # An all-empty global batch leaves the running statistics as they were, as BatchNorm does.
        # While a CUDA graph is captured no host read is allowed: the device guards an empty global batch
        # (the update keeps the old values) and a count of 1 fails a device-side assertion instead.
        guard_empty = local_count <= 1 and capturing(x.device)
        if guard_empty:
            assert_global_count_is_not_one(summed, x.size(), layer)
        update = guard_empty or not (local_count <= 1 and check_global_count(summed, x.size(), layer))
        track = update and running_mean is not None and running_var is not None
        stats = _backends.finish_statistics(
            backend, summed, local, shift, weight, bias, eps, _stats.statistics_dtype(x),
            running_mean if track else None, running_var if track else None, momentum, guard_empty=guard_empty,
        )
        saved = saved_for_backward(x, stats, local, weight)
        ctx.save_for_backward(x, *saved)
        ctx.backend = backend
        ctx.group = group
        ctx.layer = layer
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return backend.normalize(x, local, stats, weight)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = _backward(ctx, grad_output)
        if create_graph and grads[0] is not None:  # a second backward would need this one's: refuse it there
            grads = (_NotTwiceDifferentiable.apply(grads[0], grad_output, ctx.layer), *grads[1:])
        return grads


def merged_statistics(
    x: Tensor, backend: _backends.Backend, all_reduce: Callable[[Tensor], Tensor],
) -> tuple[_stats.LocalMoments, Tensor, Optional[Tensor]]:
    """This rank's moments, the rank-summed float64 buffer of every rank's moments, and the shift it is about.

    float32, float16 and bfloat16 input: ONE ``all_reduce`` of ``2C + 1`` values, sums about zero
    (None): their rounding, about ``1e-16 * (mean / std)^2`` relative to the variance, stays far
    below float32's own error, about ``1e-7 * mean / std``. float64 input: TWO, ``(n, sum x)`` for
    the global mean first (``C + 1`` values), then the ``2C + 1`` sums about it, exact whatever the
    data. The choice depends on the dtype only, the same on every rank of a model, so every rank
    takes the same collectives. Shared by the eager Function and the traceable one
    (``_traceable``): ``all_reduce`` returns the rank-summed buffer (eager: the same tensor, summed in
    place; traced: a functional collective's result). ``x`` is already in a layout the kernels keep
    (``_kernels.keep_layout``).
    """
    # The output buffer first holds the deviations of the local moments, then the output: one
    # activation-sized allocation per forward, as in local BatchNorm (fresh pages are costly).
    scratch = torch.empty_like(x) if x.dtype == _stats.statistics_dtype(x) and backend is _backends.NATIVE else None
    local = backend.local_moments(x, scratch)
    shift = None
    if x.dtype == torch.float64:
        head = backend.pack(local, None)[: 1 + x.shape[1]]  # [n, sum x]
        shift = _stats.global_mean(all_reduce(head))
    return local, all_reduce(backend.pack(local, shift)), shift


def saved_for_backward(
    x: Tensor, stats: _stats.PerChannel, local: _stats.LocalMoments, weight: Optional[Tensor]
) -> _backends.Saved:
    """The per-channel values the backward needs, in the statistics dtype."""
    stats_dtype = _stats.statistics_dtype(x)
    return _backends.Saved(
        weight=None if weight is None else weight.to(stats_dtype),
        mean=stats.mean, invstd=stats.invstd, residual=stats.residual, r_invstd2=stats.r_invstd2,
        alpha=stats.alpha, coef=stats.coef, int_count=stats.int_count, zeros=local.zeros,
    )


def _backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
    """The synchronised backward (one all-reduce of the 2C gradient sums)."""
    x, *saved = ctx.saved_tensors

    def all_reduce(sums: Tensor) -> Tensor:
        _comm.all_reduce_sum(sums, ctx.group, ctx.layer, "gradient sums")
        return sums

    grads = backward_gradients(ctx.backend, x, _backends.Saved(*saved), grad_output, ctx.needs_input_grad[:3],
                               all_reduce)
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (grads[0], _to(grads[1], weight_dtype), _to(grads[2], bias_dtype),
            None, None, None, None, None, None)


def backward_gradients(
    backend: _backends.Backend, x: Tensor, saved: _backends.Saved, grad_output: Tensor,
    needs_grad: tuple[bool, bool, bool], all_reduce: Callable[[Tensor], Tensor],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Input, weight and bias gradients (statistics dtype for the last two), ONE ``all_reduce`` of 2C sums.

    The kernels take the sums about the float32 mean m32; with (x - m) = (x - m32) - r every rank
    folds the residual r into its own sums, which stay sums (so the all-reduce adds them up):
    ``[sum dy - r invstd^2 sum dy (x - m), sum dy (x - m)]``, ``sum dy (x - m) = sum dy (x - m32) - r sum dy``.
    Shared by the eager and the traceable Function; ``all_reduce`` as in ``merged_statistics``.
    """
    dy = _kernels.like_layout(grad_output, x)
    input_needs_grad, weight_needs_grad, bias_needs_grad = needs_grad
    mean = saved.mean
    if x.numel() == 0:
        sum_dy, sum_dy_xmu = torch.zeros(2, mean.numel(), dtype=mean.dtype, device=mean.device)
    else:
        sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, saved)
    sums = torch.empty(2, mean.numel(), dtype=mean.dtype, device=mean.device)
    torch.addcmul(sum_dy_xmu, saved.residual, sum_dy, value=-1, out=sums[1])
    torch.addcmul(sum_dy, saved.r_invstd2, sums[1], value=-1, out=sums[0])
    grad_weight = None
    if weight_needs_grad:  # this rank's share, before the all-reduce; zero without local values
        grad_weight = sums[1] * saved.invstd if x.numel() else torch.zeros_like(saved.invstd)
    grad_bias = sum_dy if bias_needs_grad else None
    grad_x = None
    # needs_input_grad is the same on every rank of an identical model, so either every
    # rank takes this all-reduce or none does.
    if input_needs_grad:
        sums = all_reduce(sums)
        grad_x = torch.empty_like(x) if x.numel() == 0 else backend.backward_elemt(dy, x, saved, sums)
    return grad_x, grad_weight, grad_bias


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Identity whose backward raises: the synchronised backward is not itself differentiable."""

    @staticmethod
    def forward(ctx: Any, grad: Tensor, grad_output: Tensor, layer: str) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Optional[Tensor], ...]:
        raise SyncNormError(
            f"{ctx.layer}: double backward (a gradient of the input gradient, e.g. a gradient penalty taken "
            "with create_graph=True) is not supported by syncnorm's synchronised BatchNorm; compute that term "
            "with the layer in eval() mode, or without differentiating through this layer's backward."
        )


def _to(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return None if t is None or dtype is None else t.to(dtype)


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (no host read may happen then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def assert_global_count_is_not_one(summed: Tensor, local_size: Any, layer: str) -> None:
    """``check_global_count``'s error as a device-side assertion (no host read: CUDA graph capture)."""
    torch._assert_async(summed[0] != 1, _count_of_one_message(local_size, layer))


def _count_of_one_message(local_size: Any, layer: str) -> str:
    return (f"Expected more than 1 value per channel when training, got input size {local_size} on this "
            f"rank and 1 value per channel over the whole process group ({layer}). Use a larger "
            "global batch, or eval() mode for single samples.")


def check_global_count(summed: Tensor, local_size: Any, layer: str) -> bool:
    """Raise torch's error for a global batch of one value per channel; True when it is empty.

    ``summed`` is the rank-summed statistics buffer (its first value the global count), ``local_size``
    this rank's input size, for the message. One host sync: only for ranks of at most one value per channel.
    """
    count = int(summed[0].item())
    if count == 1:
        raise ValueError(_count_of_one_message(local_size, layer))
    return count == 0
