"""The one autograd Function of a synchronised training step: BatchNorm, with or without an activation after it.

Forward: local moments, ONE all-reduce of a (2C+1)-value float64 buffer (count, and per channel the
sum and the sum of squares about zero; float64 input takes two: the global mean first, then the sums
about it), the per-channel statistics, the normalisation (and the activation). Backward: local
gradient sums, ONE all-reduce of the 2C sums, then the input gradient with the global sums. Nothing
is kept between steps: the results are a function of the input, the parameters, the running-statistics
buffers and the group.

What varies is passed as data, never written as another Function:

- ``comm``, where the sums go: a ProcessGroup (eager: ``dist.all_reduce`` in place), its name (while
  torch.compile traces: a functional collective, which dynamo keeps in the graph), or None (one process);
- ``activation``: None (BatchNorm: autograd keeps the input) or ``(name, negative_slope, alpha)``
  (``SyncBatchNormAct``: it keeps only the output, and the backward recovers the input by inverting,
  ``_activation``);
- the kernel set, ``_backends.choose``: ``native`` aten ops or torch's ``fused`` SyncBatchNorm kernels,
  with the per-channel math once in aten (``_stats``) and its Triton twin (``_triton``), bitwise alike;
- eager or traced: an eager step updates the running statistics inside the Function (one Triton kernel
  on a GPU) and checks a global count of one on the host; a traced step returns the count and the
  float64 moments and the caller updates the buffers with the same operations (``_stats.update_running``),
  the count check being the custom op ``syncnorm::check_global_count``.

``sync_batch_norm`` is the one entry: every syncnorm layer (built, converted or fused) calls it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from . import _activation, _backends, _comm, _kernels, _stats
from ._errors import SyncNormError

# An activation as the Function takes it: (name, negative_slope, alpha), constants dynamo keeps in the graph.
ActivationSpec = Optional[tuple[str, float, float]]
Momentum = Union[float, Tensor]


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
    *,
    group: Optional[_comm.ProcessGroup] = None,
    layer: str = "syncnorm.sync_batch_norm",
    activation: ActivationSpec = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` (then ``activation``) over the batch of every rank of ``group``.

    The one place where a layer's step chooses between plain ``F.batch_norm`` and the Function, eager
    or traced; ``SyncBatchNorm``, ``SyncBatchNormAct`` and the subclasses ``convert_model`` generates all
    come through here. ``group`` is the resolved statistics group (``_comm.statistics_group``), None for
    no synchronisation; ``momentum`` is the running-average factor of this step (a 0-dim tensor while
    compiling a cumulative average). With an activation a training step keeps only its output, in one
    process too; without a group and without an activation it is plain ``F.batch_norm``.
    """
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    compiling = compiling_now()
    # Plain batch_norm (with the activation after it) where no Function is needed: eval mode; one process,
    # unless an activation saves memory there (not under forward AD or torch.func, which the Function lacks)
    # or a compiled cumulative average takes its factor as a tensor (F.batch_norm wants a float).
    if not training or (group is None and not (compiling and isinstance(momentum, Tensor))
                        and (activation is None or transformed())):
        output = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)  # type: ignore[arg-type]
        return output if activation is None else _activation.Activation(*activation).forward_(output)
    keep = activation is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    if compiling:
        outputs = SyncBatchNormFunction.apply(input, weight, bias, None, None, eps, 0.0, _comm.group_name(group),
                                              layer, activation, keep)
        output, count, moments = outputs[:3]  # (a kept-channel index may follow: dynamo needs it as an output)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # traced as in-place updates of the buffers, after the Function
                # Only a rank with no values can see an all-empty global batch, which leaves them as they were.
                _stats.update_running(running_mean, running_var, count, moments, momentum,
                                      guard_empty=_stats.values_per_channel(input) == 0)
        return output
    refuse_forward_ad(layer, input, weight, bias)
    refuse_functorch(layer, input, weight, bias)
    result: Tensor = SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, eps, momentum,
                                                 group, layer, activation, keep)
    return result


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm (and ``activation``) over the batch of every rank of ``comm`` (see the module)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        eps: float,
        momentum: Momentum,
        comm: _comm.Comm,
        layer: str,
        activation: ActivationSpec = None,
        keep: bool = False,
    ) -> Any:
        traced = compiling_now()
        backend = _backends.choose(x, _missing_fused_ops_traced if traced else _backends.missing_fused_ops)
        x = _kernels.keep_layout(x)
        local_count = _stats.values_per_channel(x)
        local, summed, shift = merged_statistics(
            x, backend, lambda buffer: _comm.all_reduce(buffer, comm, layer, "batch statistics"))
        # Only a rank with at most one local value can be part of a global count <= 1, so the others skip the
        # check (a host sync). Every rank of such a batch takes the same branch: a global count of 1 raises on
        # all of them (before any state changes), and none is left waiting in a collective. An all-empty global
        # batch leaves the running statistics as they were, as BatchNorm does. While a CUDA graph is captured
        # no host read is allowed: the device guards an empty global batch and asserts the count.
        capture = not traced and capturing(x.device)
        guard_empty = local_count <= 1 and capture
        update = True
        if local_count <= 1:
            if traced:
                summed = _checked_global_count(summed, str(x.size()), layer)
            elif guard_empty:
                assert_global_count_is_not_one(summed, x.size(), layer)
            else:
                update = not check_global_count(summed, x.size(), layer)
        track = update and running_mean is not None and running_var is not None
        dtype = _stats.statistics_dtype(x)
        stats = _backends.finish_statistics(
            backend, summed, local, shift, weight, bias, eps, dtype, running_mean if track else None,
            running_var if track else None, momentum, triton=not traced, guard_empty=guard_empty,
        )
        y = backend.normalize(x, local, stats, weight)
        ctx.backend, ctx.comm, ctx.layer, ctx.input_dtype = backend, comm, layer, x.dtype
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.activation = None if activation is None else _activation.Activation(*activation)
        fallback = None
        if activation is None:
            ctx.save_for_backward(x, *saved_for_backward(x, stats, local, weight))
        else:
            y = ctx.activation.forward_(y)
            kept = None
            # Nothing to keep for a forward without backward. An empty rank chooses too: its backward's
            # per-channel factors must stay finite (a zero weight).
            if keep and capture:  # the whole input, no choice (static shapes, no host sync): saves no memory
                kept = x
            elif keep:
                fallback = _kept_channels(y, weight, bias, activation, dtype, traced)
                kept = None if fallback is None else x.index_select(1, fallback)
            ctx.save_for_backward(*activation_saved(y, weight, bias, stats, dtype), fallback, kept)
        if not traced:
            return y
        # Traced: no state written inside the Function; the caller updates the running statistics from these.
        assert stats.moments is not None  # aten ops: the float64 moments
        count, moments = stats.num_values.clone(), stats.moments.clone()
        if fallback is None:
            ctx.mark_non_differentiable(count, moments)
            return y, count, moments
        # The index is an output too: dynamo needs the unbacked size the custom op creates in an output of the
        # Function (it is not differentiable, and the caller drops it).
        fallback = fallback.clone()
        ctx.mark_non_differentiable(count, moments, fallback)
        return y, count, moments, fallback

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
        create_graph = torch.is_grad_enabled() and not compiling_now()

        def all_reduce(sums: Tensor) -> Tensor:
            return _comm.all_reduce(sums, ctx.comm, ctx.layer, "gradient sums")

        needs_grad = ctx.needs_input_grad[:3]
        with torch.no_grad():
            if ctx.activation is None:
                x, *saved = ctx.saved_tensors
                grad_x, grad_weight, grad_bias = backward_gradients(
                    ctx.backend, x, _backends.Saved(*saved), grad_output, needs_grad, all_reduce)
            else:
                grad_x, grad_weight, grad_bias = activation_backward_gradients(
                    ctx.backend, ctx.activation, saved_output(ctx, ctx.layer), grad_output, needs_grad, all_reduce)
            grad_x = None if grad_x is None else grad_x.to(ctx.input_dtype)
        if create_graph and grad_x is not None:  # a second backward would need this one's: refuse it there
            grad_x = _NotTwiceDifferentiable.apply(grad_x, grad_output, ctx.layer)
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (grad_x, _to(grad_weight, weight_dtype), _to(grad_bias, bias_dtype),
                None, None, None, None, None, None, None, None)


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
    """BatchNorm's per-channel values for the backward, in the statistics dtype (autograd keeps ``x`` beside them)."""
    stats_dtype = _stats.statistics_dtype(x)
    return _backends.Saved(
        weight=None if weight is None else weight.to(stats_dtype),
        mean=stats.mean, invstd=stats.invstd, residual=stats.residual, r_invstd2=stats.r_invstd2,
        alpha=stats.alpha, coef=stats.coef, int_count=stats.int_count, zeros=local.zeros,
    )


def activation_saved(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stats: _stats.PerChannel,
                     dtype: torch.dtype) -> tuple[Optional[Tensor], ...]:
    """What a step with an activation keeps: the output and per-channel values (before the kept channels)."""
    return (y, None if weight is None else weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype),
            stats.mean, stats.residual, stats.invstd, stats.alpha, None if stats.coef is None else stats.coef[0],
            stats.int_count)


def _kept_channels(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: tuple[str, float, float],
                   dtype: torch.dtype, traced: bool) -> Optional[Tensor]:
    """The channels that keep their input (``_activation.fallback_channels``); traced, its custom op."""
    weight = None if weight is None else weight.detach()
    bias = None if bias is None else bias.detach()
    if traced:  # an index of unbacked size, possibly empty: the backward takes the same ops either way
        index: Tensor = _activation.fallback_index_op(y, weight, bias, *activation, dtype)
        return index
    return _activation.fallback_channels(y, weight, bias, _activation.Activation(*activation), dtype)


def saved_output(ctx: Any, layer: str) -> tuple[Optional[Tensor], ...]:
    """``ctx.saved_tensors`` of a step that keeps its output; an in-place change of it raises naming the layer.

    A layer that keeps only its output (SyncBatchNormAct, a BatchNorm fused with its activation by
    ``convert_model(fuse_activation=True)``) recovers its input from it: a model that adds to that output in
    place (``out += identity``) destroys what the backward needs, and torch's own message names neither.
    """
    try:
        saved: tuple[Optional[Tensor], ...] = ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(
            f"{layer} keeps only its output for backward (it recovers its input from it), and that output was "
            "modified in place after the layer (out += identity, out.add_(x), torch.relu_(out), an activation "
            "with inplace=True), so its gradient cannot be computed. Write that operation out of place "
            "(out = out + identity), or leave this layer unfused: convert_model(model, fuse_activation=False), or "
            "syncnorm.SyncBatchNorm followed by the activation module."
        ) from error
    return saved


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


def _native_backward_elemt_into(dy: Tensor, x: Tensor, saved: _backends.Saved, sums: Tensor) -> Tensor:
    """``_backends.NATIVE``'s input gradient, the same ops, written into ``x`` (a ``z`` of our own, not needed after).

    On a CPU a fresh activation-sized tensor costs about as much as a pass over it (page faults): this saves one.
    """
    assert saved.coef is not None
    constant, slope = sums * saved.coef
    grad = x.sub_(_kernels.per_channel(saved.mean, x))
    _kernels.affine(grad, slope, constant, out=grad, zeros=saved.zeros)
    return grad.addcmul_(dy, _kernels.per_channel(saved.alpha, x))


_NATIVE_INTO = _backends.NATIVE._replace(backward_elemt=_native_backward_elemt_into)


def activation_backward_gradients(
    backend: _backends.Backend, activation: _activation.Activation, saved: tuple[Optional[Tensor], ...],
    grad_output: Tensor, needs_grad: tuple[bool, bool, bool], all_reduce: Callable[[Tensor], Tensor],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """z and dz from the output, then BatchNorm's backward of z (ONE ``all_reduce`` of the 2C sums).

    ``saved``: ``activation_saved``'s values, then the kept channels' index and their input (both None:
    nothing kept; an index None and an input: the whole input, kept while a CUDA graph was captured).
    ``all_reduce`` as in ``backward_gradients``.
    """
    y, weight, bias, mean, residual, invstd, alpha, coef, int_count, fallback, kept = saved
    assert y is not None and mean is not None and residual is not None and invstd is not None and alpha is not None
    dtype = mean.dtype
    dz = _kernels.like_layout(activation.backward(grad_output, y, dtype), y)
    whole = fallback is None and kept is not None
    z = kept.to(dtype) if kept is not None and whole else activation.inverse(y, dtype, writable=fallback is not None)
    # BatchNorm's backward, written for an input z with per-channel "mean" bias and "invstd" 1 / weight: its
    # xhat is (z - bias) / weight, this layer's, so its gradients are this layer's (grad_weight = sum dz xhat,
    # grad_bias = sum dz, grad_x = alpha (dz - mean dz - xhat mean dz xhat), alpha = weight invstd). z - bias is
    # formed per element before any product (as x - mean is), so a large bias cancels no digits beyond z's own.
    zeros = torch.zeros_like(invstd)
    if whole:  # BatchNorm's backward on the input: mean m32 + residual, the batch's invstd
        center, shift, scale = mean, residual, invstd
    else:
        center = zeros if bias is None else bias
        scale = torch.ones_like(invstd) if weight is None else weight.reciprocal()
        shift = zeros
    if fallback is not None:
        # Channels the inversion cannot serve run the ordinary BatchNorm backward on their kept input: mean
        # m32 + residual, invstd the batch's, as BatchNorm's backward (exact whatever the weight).
        assert kept is not None
        z.index_copy_(1, fallback, kept.to(dtype))
        center = center.index_copy(0, fallback, mean[fallback])
        shift = shift.index_copy(0, fallback, residual[fallback])
        scale.index_copy_(0, fallback, invstd[fallback])
    scale2 = scale * scale
    fused = backend is _backends.FUSED
    saved = _backends.Saved(
        weight=alpha / scale if fused else None, mean=center, invstd=scale, residual=shift,
        r_invstd2=zeros if kept is None else shift * scale2, alpha=alpha,
        coef=None if coef is None else torch.stack([coef, coef * scale2]), int_count=int_count, zeros=zeros,
    )

    def reduce(sums: Tensor) -> Tensor:
        # backward_gradients' sums are about this rank's centers and scales, [sum dz - r s^2 S, S]
        # with S = sum dz (z - center - r); ranks may choose different channels to keep (ELU's tail is the
        # batch's, an empty rank has none), so they are summed as [sum dz, s S = sum dz xhat], the same
        # quantities on every rank, and turned back into this rank's form (r = 0 without kept channels).
        if kept is not None:
            sums[0].addcmul_(saved.r_invstd2, sums[1])
        sums[1].mul_(scale)
        sums = all_reduce(sums)
        sums[1].div_(scale)
        if kept is not None:
            sums[0].addcmul_(saved.r_invstd2, sums[1], value=-1)
        return sums

    native_into = backend is _backends.NATIVE and z is not y and z is not kept  # z is ours to overwrite
    return backward_gradients(_NATIVE_INTO if native_into else backend, z, saved, dz, needs_grad, reduce)


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


@torch.library.custom_op("syncnorm::check_global_count", mutates_args=())
def _checked_global_count(summed: Tensor, local_size: str, layer: str) -> Tensor:
    """``summed`` (a copy) after ``check_global_count``: a custom op, so that a traced graph keeps the check.

    Emitted only where the static local shape has at most one value per channel, as eager checks only there.
    """
    check_global_count(summed, local_size, layer)
    return summed.clone()


@_checked_global_count.register_fake
def _(summed: Tensor, local_size: str, layer: str) -> Tensor:
    return torch.empty_like(summed)


def _missing_fused_ops_traced(device: torch.device) -> tuple[str, ...]:
    return _missing_fused_ops_on(device.type)


def _missing_fused_ops_on(device_type: str) -> tuple[str, ...]:
    """``_backends.missing_fused_ops`` as a constant of the trace (dynamo cannot trace its dispatcher query)."""
    return tuple(_backends.missing_fused_ops(torch.device(device_type)))


# What torch.compiler.assume_constant_result(fn) does (it sets this mark), without importing torch._dynamo:
# importing syncnorm must not import dynamo (tests/test_compile.py checks it).
_missing_fused_ops_on._dynamo_marked_constant = True  # type: ignore[attr-defined]


def compiling_now() -> bool:
    """Whether dynamo is tracing this code (torch.compile)."""
    return bool(torch.compiler.is_compiling())


def transformed() -> bool:
    """Whether forward-mode AD or a torch.func transform is active (the Function supports neither)."""
    return forward_ad._current_level >= 0 or (_functorch_active is not None and bool(_functorch_active()))


def refuse_forward_ad(layer: str, *tensors: Optional[Tensor]) -> None:
    """Refuse dual tensors before the Function runs: it has no jvp, and torch would raise only after the update."""
    if forward_ad._current_level < 0:  # no dual level entered: nothing can be a dual tensor (no op, no cost)
        return
    if any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"{layer}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported by a "
            "synchronised training forward; nothing was changed. Use reverse mode (backward), or run the layer "
            "in eval() mode or without a process group, where it is plain batch_norm and supports it."
        )


# One C call answers whether a torch.func transform is active (what Function.apply itself asks); torch keeps it
# private, so if a release drops it, fall back to looking for functorch-wrapped operands.
_functorch_active: Optional[Callable[[], bool]] = getattr(torch._C, "_are_functorch_transforms_active", None)


def refuse_functorch(layer: str, *tensors: Optional[Tensor]) -> None:
    """Refuse torch.func transforms before the Function runs: it has no setup_context or vmap rule."""
    if _functorch_active is not None:
        if not _functorch_active():  # no transform: one C call, next to nothing per layer call
            return
    elif not any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return
    raise NotImplementedError(
        f"{layer}: torch.func transforms (grad, vmap, jacrev, functionalize, ...) are not supported through a "
        "synchronised training forward; refused before its all-reduce, nothing was changed. Use reverse mode "
        "(loss.backward() or torch.autograd.grad), or run the layer in eval() mode, without a process group, or "
        "in a process group of one rank, where it is plain batch_norm and torch.func supports it."
    )
