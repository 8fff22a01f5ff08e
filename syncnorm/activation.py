"""``syncnorm.SyncBatchNormAct``: synchronised BatchNorm + an invertible activation, keeping only its output.

In a conv -> BatchNorm -> activation -> conv chain autograd keeps the BatchNorm input, the activation
input and the activation output (the next convolution's input) for backward. This layer keeps the
output only (which the next layer keeps anyway) and per-channel values, as In-Place Activated
BatchNorm does (Rota Bulo et al., CVPR 2018), and recovers what the backward needs by inverting:

- ``z = act^-1(y)`` (leaky ReLU: ``y / slope`` where ``y < 0``; ELU: ``log1p(y / alpha)`` where ``y < 0``),
  ``xhat = (z - bias) / weight`` (BatchNorm's own parameters: no ``|weight|`` re-parametrisation);
- ``dz = dy * act'(z)``, read from ``y`` (its sign, and ``y + alpha`` for ELU), as torch's in-place
  activations do;
- the BatchNorm backward on ``xhat``: ONE all-reduce of the 2C sums ``[sum dz, sum dz xhat]``, then
  ``grad_x = weight invstd (dz - sum dz / N - xhat sum dz xhat / N)`` with the global sums.

That backward is ``_function.backward_gradients`` of a BatchNorm whose input is ``z``, with the bias
as its mean and ``1 / weight`` as its invstd (so its ``xhat`` is this layer's), scaled by ``alpha =
weight invstd``: the reductions, the input gradient and the all-reduce go through the kernel backend of
the step (``native`` or ``fused``, ``_backends``); the inversion (``_Activation``) is aten ops on every
backend. Its all-reduce sums ``[sum dz, sum dz xhat]``, the same quantities on every rank. The forward
is ``SyncBatchNormFunction``'s: ``merged_statistics`` and ``finish_statistics`` (same all-reduce and
count check), then the activation in place.

Where the inversion is not accurate (``_fallback_channels``: a zero or tiny weight, a bias much larger
than the weight, ELU deep in its flat tail) the layer also keeps those channels' input (and only those),
so every channel's gradients are exact. While a CUDA graph is captured it keeps the whole input instead
(that choice is a host read). ``backward_gradients`` is shared with the traceable Function that
``torch.compile`` traces (``_traceable.TraceableSyncBatchNormActFunction``).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import _backends, _comm, _function, _kernels, _stats, _validate
from .batchnorm import (
    _compiling,
    _refuse_forward_ad,
    _refuse_functorch,
    _run_eagerly,
    begin_forward,
    check_input,
    recomputing_forward,
    saved_output,
)

ACTIVATIONS = ("leaky_relu", "elu", "identity")

# How many units of the output dtype's rounding the inversion may cost a channel's recovered xhat
# (absolute, on xhat of order 1; see _fallback_channels). float32: 64 u = 64 * 2^-24 ~ 4e-6, a
# fraction of float32's tolerances (1e-5) and of what the gradient's own float32 arithmetic costs
# at |xhat| ~ 10. float16/bfloat16 keep 11/8 bits: 4 u costs 2 of them, as much as rounding twice.
_MAX_LOSS = {torch.float64: 64.0, torch.float32: 64.0, torch.float16: 4.0, torch.bfloat16: 4.0}


# Below this |weight| a channel keeps its input whatever K says: the backward's 1 / weight^2 stays < 2^100.
_MIN_WEIGHT = 2.0**-50


def _transformed() -> bool:
    """Whether forward-mode AD or a torch.func transform is active (the Function supports neither)."""
    if forward_ad._current_level >= 0:
        return True
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


class _Activation:
    """The activation of a layer: its in-place forward, its inverse and its derivative, all read from ``y``."""

    __slots__ = ("name", "negative_slope", "alpha")

    def __init__(self, name: str, negative_slope: float, alpha: float) -> None:
        self.name = name
        self.negative_slope = negative_slope
        self.alpha = alpha

    def forward_(self, y: Tensor) -> Tensor:
        """``act(y)`` in place (``y`` is a fresh tensor or one autograd may change in place)."""
        if self.name == "leaky_relu":
            return F.leaky_relu_(y, self.negative_slope)
        if self.name == "elu":
            return F.elu_(y, self.alpha)
        return y

    def inverse(self, y: Tensor, dtype: torch.dtype, writable: bool) -> Tensor:
        """``z = act^-1(y)`` in ``dtype``; never ``y`` itself (the saved output) when ``writable``.

        Leaky ReLU's inverse is leaky ReLU with slope ``1 / slope``: one pass, ``z`` to 2 units of rounding.
        """
        if self.name == "leaky_relu":
            if y.dtype != dtype:
                return F.leaky_relu_(y.to(dtype), 1 / self.negative_slope)
            return F.leaky_relu(y, 1 / self.negative_slope)
        y = y.to(dtype)
        if self.name == "elu":
            # y = alpha (exp(z) - 1) > -alpha; a y rounded to -alpha (z below ~-17 in float32) would give
            # -inf: such a channel is never inverted (_fallback_channels), so the value does not matter.
            return torch.where(y < 0, torch.log1p(y / self.alpha), y)
        return y.clone() if writable and y.dtype == dtype else y

    def backward(self, dy: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
        """``dz = dy * act'(z)`` in ``dtype``, from the output ``y`` as torch's in-place activations compute it."""
        dy = dy.to(dtype)
        if self.name == "leaky_relu":
            return torch.ops.aten.leaky_relu_backward(dy, y.to(dtype), self.negative_slope, True)
        if self.name == "elu":
            return torch.ops.aten.elu_backward(dy, self.alpha, 1.0, 1.0, True, y.to(dtype))
        return dy

    def tail_loss(self, y: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        """Per channel, ``exp(-z_min) - 1`` for ELU: the inversion's error of ``z`` in units of ``y``'s rounding.

        ``y = alpha (exp(z) - 1)`` rounded to ``u |y|`` gives ``z`` to ``u (exp(-z) - 1)``: ELU's flat
        tail keeps few bits of ``z``. None for the other activations (their inverse is exact to ``u |z|``).
        """
        if self.name != "elu" or y.numel() == 0:
            return None
        low = y.amin(dim=_stats.reduce_dims(y)).to(dtype).clamp(max=0)
        # 1 + y / alpha = exp(z); at y = -alpha (rounded) the loss is inf: that channel is not inverted.
        return (low / self.alpha).log1p_().neg_().exp_().sub_(1)

    def __repr__(self) -> str:
        if self.name == "leaky_relu":
            return f"activation='leaky_relu', negative_slope={self.negative_slope}"
        if self.name == "elu":
            return f"activation='elu', alpha={self.alpha}"
        return "activation='identity'"


def _fallback_channels(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: _Activation,
                       dtype: torch.dtype) -> Optional[Tensor]:
    """The channels whose ``xhat`` the backward cannot recover accurately from ``y`` (an index tensor), or None.

    With ``u`` the unit roundoff of ``y``'s dtype, the recovered ``xhat = (z - bias) / weight`` of a
    channel carries an absolute error of about ``u (|xhat| + K)`` where
    ``K = (|bias| + tiny / min(1, slope) + [ELU] (exp(-z_min) - 1)) / |weight|``: the rounding of
    ``y`` near ``bias`` (which keeps few bits of ``weight * xhat`` when the bias is much larger),
    underflow of ``y`` to the dtype's subnormals (``tiny``: its smallest normal number), and the ELU tail
    (``tail_loss``). A channel is inverted when ``K <= _MAX_LOSS[dtype]``; a zero, subnormal or
    non-finite weight, or a NaN anywhere, gives a K that is not (NaN compares false), so that channel
    keeps its input instead. Negative weights are inverted like positive ones (only ``|weight|``
    enters K). One host sync (the size of the index) where anything must be checked; none for
    ``affine=False`` with leaky ReLU or identity.
    """
    tail = activation.tail_loss(y, dtype)
    if weight is None and tail is None:
        return None
    slope = activation.negative_slope if activation.name == "leaky_relu" else 1.0
    finfo = torch.finfo(y.dtype)
    loss = torch.full((y.shape[1],), finfo.tiny / min(1.0, slope), dtype=dtype, device=y.device)
    if bias is not None:
        loss = loss + bias.detach().to(dtype).abs()
    if tail is not None:
        loss = loss + tail
    if weight is not None:
        loss = loss / weight.detach().to(dtype).abs()
    bad = (loss <= _MAX_LOSS[y.dtype]).logical_not_()
    if weight is not None:  # the backward squares 1 / weight: keep it far from overflow (float32: 2^100)
        bad.logical_or_(weight.detach().abs() < _MIN_WEIGHT)
    index = bad.nonzero().view(-1)
    return index if index.numel() else None


def fallback_index(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: _Activation,
                   dtype: torch.dtype) -> Tensor:
    """``_fallback_channels`` as an index tensor, empty where nothing must be kept (the traced path's custom op)."""
    index = _fallback_channels(y, weight, bias, activation, dtype)
    return torch.empty(0, dtype=torch.long, device=y.device) if index is None else index


class SyncBatchNormActFunction(torch.autograd.Function):
    """Training-mode ``activation(BatchNorm(x))`` over the batch of every rank of ``group``, keeping ``y``."""

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
        activation: _Activation,
        grad_enabled: bool,
    ) -> Tensor:
        backend = _backends.choose(x)
        x = _kernels.keep_layout(x)
        local_count = _stats.values_per_channel(x)

        def all_reduce(packed: Tensor) -> Tensor:
            if group is not None:  # None: one process, its own sums are the global ones
                _comm.all_reduce_sum(packed, group, layer, "batch statistics")
            return packed

        # The statistics exactly as SyncBatchNormFunction.forward computes them (see there for why).
        local, summed, shift = _function.merged_statistics(x, backend, all_reduce)
        # While a CUDA graph is captured no host read may happen: as SyncBatchNormFunction, the device guards
        # the global count, and the layer keeps its whole input instead of choosing channels (a nonzero).
        capturing = _function.capturing(x.device)
        guard_empty = local_count <= 1 and capturing
        if guard_empty:
            _function.assert_global_count_is_not_one(summed, x.size(), layer)
        update = guard_empty or not (local_count <= 1 and _function.check_global_count(summed, x.size(), layer))
        track = update and running_mean is not None and running_var is not None
        stats_dtype = _stats.statistics_dtype(x)
        stats = _backends.finish_statistics(
            backend, summed, local, shift, weight, bias, eps, stats_dtype,
            running_mean if track else None, running_var if track else None, momentum, guard_empty=guard_empty,
        )
        y = activation.forward_(backend.normalize(x, local, stats, weight))

        ctx.backend = backend
        ctx.group = group
        ctx.layer = layer
        ctx.activation = activation
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.input_dtype = x.dtype
        fallback = kept = None
        # Nothing to keep for a forward without backward (needs_input_grad is True under no_grad too). An empty
        # rank chooses too: its backward's per-channel factors must stay finite (a zero weight).
        if grad_enabled and any(ctx.needs_input_grad[:3]):
            if capturing:  # the whole input, no choice (static shapes, no host sync): exact, saves no memory
                kept = x
            else:
                fallback = _fallback_channels(y, weight, bias, activation, stats_dtype)
                kept = None if fallback is None else x.index_select(1, fallback)
        ctx.save_for_backward(*saved_for_backward(y, weight, bias, stats, stats_dtype), fallback, kept)
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = _backward(ctx, grad_output)
        if create_graph and grads[0] is not None:  # as SyncBatchNormFunction: a second backward raises there
            grads = (_function._NotTwiceDifferentiable.apply(grads[0], grad_output, ctx.layer), *grads[1:])
        return grads


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


def saved_for_backward(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stats: _stats.PerChannel,
                       dtype: torch.dtype) -> tuple[Optional[Tensor], ...]:
    """The output and the per-channel values ``backward_gradients`` takes (before the kept channels)."""
    return (y, None if weight is None else weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype),
            stats.mean, stats.residual, stats.invstd, stats.alpha, None if stats.coef is None else stats.coef[0],
            stats.int_count)


def _backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
    """The synchronised backward of the eager Function (one all-reduce of the 2C sums)."""

    def all_reduce(sums: Tensor) -> Tensor:
        if ctx.group is not None:
            _comm.all_reduce_sum(sums, ctx.group, ctx.layer, "gradient sums")
        return sums

    grad_x, grad_weight, grad_bias = backward_gradients(
        ctx.backend, ctx.activation, saved_output(ctx, ctx.layer), grad_output, ctx.needs_input_grad[:3], all_reduce)
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (None if grad_x is None else grad_x.to(ctx.input_dtype), _function._to(grad_weight, weight_dtype),
            _function._to(grad_bias, bias_dtype), None, None, None, None, None, None, None, None)


def backward_gradients(
    backend: _backends.Backend, activation: _Activation, saved: tuple[Optional[Tensor], ...], grad_output: Tensor,
    needs_grad: tuple[bool, bool, bool], all_reduce: Callable[[Tensor], Tensor],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """z and dz from the output, then BatchNorm's backward of z (ONE ``all_reduce`` of the 2C sums).

    ``saved``: ``saved_for_backward``'s values, then the kept channels' index and their input (both None:
    nothing kept; an index None and an input: the whole input, kept while a CUDA graph was captured).
    Shared by the eager Function and the traceable one (``_traceable``); ``all_reduce`` as in
    ``_function.backward_gradients``.
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
    if whole:  # SyncBatchNormFunction's backward on the input: mean m32 + residual, the batch's invstd
        center, shift, scale = mean, residual, invstd
    else:
        center = zeros if bias is None else bias
        scale = torch.ones_like(invstd) if weight is None else weight.reciprocal()
        shift = zeros
    if fallback is not None:
        # Channels the inversion cannot serve run the ordinary BatchNorm backward on their kept input: mean
        # m32 + residual, invstd the batch's, as SyncBatchNormFunction's backward (exact whatever the weight).
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
        # _function.backward_gradients' sums are about this rank's centers and scales, [sum dz - r s^2 S, S]
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
    return _function.backward_gradients(_NATIVE_INTO if native_into else backend, z, saved, dz, needs_grad, reduce)


class SyncBatchNormAct(_BatchNorm):
    r"""Synchronised BatchNorm followed by an invertible activation, keeping only its output for backward.

    ``activation(BatchNorm(x))`` with the statistics of the batch of every rank, as
    ``syncnorm.SyncBatchNorm`` followed by ``torch.nn.LeakyReLU``, ``torch.nn.ELU`` or nothing, but autograd
    keeps only the layer's output (which the next layer keeps anyway) and per-channel values: the
    backward recovers the normalised input by inverting the activation and the affine step (In-Place
    Activated BatchNorm, Rota Bulo et al., 2018). In a conv -> BatchNorm -> leaky ReLU chain that is one
    activation-sized tensor kept per block instead of three. Results are those of BatchNorm + the activation on
    the global batch, to the accuracy of the input dtype: channels whose inversion would lose accuracy
    (a zero or tiny weight, a bias much larger than the weight, ELU deep in its flat tail) also keep
    their own input, and only those. Parameters, buffers and ``state_dict`` keys are BatchNorm's (the
    weight is the weight, negative or zero allowed), so checkpoints load both ways with
    ``torch.nn.BatchNorm2d``.

    Communication is ``syncnorm.SyncBatchNorm``'s: one all-reduce forward, one of 2C values backward,
    none in eval mode, without a process group or in a group of one rank. The memory saving does not
    depend on synchronisation: a training step in one process keeps only the output too. Eval mode, and a
    one-process forward under forward-mode AD or a torch.func transform, are ``F.batch_norm`` followed by
    the activation.

    Host syncs: a training step whose input or parameters need a gradient takes ONE (the ``nonzero`` that
    chooses the channels to keep; none for a layer without weight whose activation is not ELU, none under
    ``torch.no_grad()``). On a CPU it costs next to nothing; on a GPU the host waits there for the
    forward's kernels before queuing more. While a CUDA graph is captured (no host read allowed) the layer
    takes none: it keeps its whole input instead (static shapes, exact, but no memory saved over
    ``SyncBatchNorm`` + the activation), and guards the global count on the device as ``SyncBatchNorm`` does.

    ``torch.compile(fullgraph=True)`` traces a training forward whole (the same one all-reduce each way
    in the graph, two forward for float64 input, as for ``SyncBatchNorm``): the channel
    choice is the custom op ``syncnorm::act_fallback_channels``, whose index has a data-dependent
    (unbacked) size in the graph, and it still takes its host sync. In validation mode the layer runs
    eagerly under compile (one graph break), as ``SyncBatchNorm`` does.

    Args:
        num_features: number of channels C.
        eps: added to the variance for numerical stability.
        momentum: factor of the running averages; None for a cumulative average.
        affine: whether the layer has a learnable weight and bias.
        track_running_stats: whether to keep running_mean/running_var/num_batches_tracked.
        process_group: the ranks whose batches are pooled (default: the whole world): a ProcessGroup or a
            DeviceMesh (an N-D mesh pools all of its ranks).
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: whether an affine layer has a bias.
        activation: ``"leaky_relu"``, ``"elu"`` or ``"identity"`` (the invertible ones; ReLU is not).
        negative_slope: leaky ReLU's slope for negative values; must be positive.
        alpha: ELU's alpha; must be positive.

    Shape:
        - Input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W).
        - Output: same shape, dtype and memory format as the input.

    Raises:
        ValueError: from the constructor: an unknown ``activation``, or a ``negative_slope`` or ``alpha``
            that is not positive; from ``forward``, as ``syncnorm.SyncBatchNorm``: a bad input, ``eps <= 0``
            in training mode, a global batch of one value per channel.
        TypeError: from ``forward``: an input that is not a floating tensor of a dtype the kernels take.
        NotImplementedError: forward-mode AD or a torch.func transform (grad, vmap, ...) through a synchronised
            training forward, naming the layer.
        RuntimeError: from backward: the layer's output was modified in place (``out += identity``); it names the
            layer and how to fix it.
        SyncNormError: a problem between ranks, naming the layer, or a double backward through the layer.

    Example:
        >>> layer = syncnorm.SyncBatchNormAct(64, activation="leaky_relu", negative_slope=0.01)
        >>> y = layer(torch.randn(8, 64, 16, 16))  # on every rank, after init_process_group
        >>> y.shape
        torch.Size([8, 64, 16, 16])
    """

    _syncnorm_layer: ClassVar[bool] = True  # is_syncnorm_layer's mark

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: _comm.GroupOrMesh = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        activation: str = "leaky_relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"SyncBatchNormAct expected activation to be one of {', '.join(ACTIVATIONS)}, got {activation!r}; "
                "other activations (ReLU, SiLU, GELU) are not invertible: use syncnorm.SyncBatchNorm and the "
                "activation module."
            )
        if activation == "leaky_relu" and not negative_slope > 0:
            raise ValueError(
                f"SyncBatchNormAct expected a positive negative_slope for leaky_relu, got {negative_slope} (a zero "
                "or negative slope is not invertible)."
            )
        if activation == "elu" and not alpha > 0:
            raise ValueError(f"SyncBatchNormAct expected a positive alpha for elu, got {alpha}.")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.process_group = _comm.resolve_group(process_group, "syncnorm.SyncBatchNormAct")
        self.layer_name: Optional[str] = None  # qualified name in the model, for error messages
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._activation()!r}"

    def _activation(self) -> _Activation:
        return _Activation(self.activation, self.negative_slope, self.alpha)

    def _describe(self) -> str:
        name = f" '{self.layer_name}'" if self.layer_name else ""
        return f"syncnorm.SyncBatchNormAct{name} (num_features={self.num_features})"

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(input, self.num_features, self._describe())

    def forward(self, input: Tensor) -> Tensor:
        """``activation(BatchNorm(input))`` with the global batch's statistics (training) or the running ones.

        In training mode every rank of the process group must call it (its all-reduce is collective).

        Args:
            input: this rank's batch; it may hold zero samples, and ranks' batch sizes may differ.

        Returns:
            The activated, normalised tensor, of the input's shape, dtype and memory format.

        Raises:
            ValueError: a bad input (dimensions, channels), ``eps <= 0``, or a global count of 1.
            TypeError: an input that is not a floating tensor of a dtype the kernels take.
            SyncNormError: a problem between ranks (see the class).

        Example:
            >>> layer = syncnorm.SyncBatchNormAct(3, activation="elu")
            >>> layer(torch.randn(4, 3, 8, 8)).shape
            torch.Size([4, 3, 8, 8])
        """
        if self.training and _compiling() and _comm.distributed_ready() and _validate.enabled():
            # As SyncBatchNorm: validation's all-gathers are not traceable, so in validation mode a training
            # forward under torch.compile runs eagerly (one graph break). Otherwise it is traced whole.
            return _run_eagerly(self._forward, input)
        return self._forward(input)

    def _forward(self, input: Tensor) -> Tensor:
        description = self._describe()
        validating = begin_forward(self, input, description)
        group = _comm.statistics_group(self.process_group, description) if self.training else None
        # As SyncBatchNorm: a forward recomputed inside backward (activation checkpointing) synchronises
        # but updates nothing.
        recomputing = recomputing_forward()
        tracks = self.training and self.track_running_stats and self.num_batches_tracked is not None
        tracks = tracks and not recomputing
        factor: float | Tensor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        elif tracks and _compiling():  # the cumulative average's weight as a tensor: no host sync in the graph
            factor = (self.num_batches_tracked + 1).double().reciprocal()  # type: ignore[operator, union-attr]
        elif tracks:
            factor = 1.0 / float(self.num_batches_tracked + 1)  # type: ignore[operator]
        uses_buffers = not self.training or (self.track_running_stats and not recomputing)
        running_mean = self.running_mean if uses_buffers else None
        running_var = self.running_var if uses_buffers else None
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if self.training and self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        # Training keeps only the output in one process too (no group: the Function's sums are this rank's
        # own); eval mode, and a forward under forward-mode AD or torch.func in one process, are plain
        # batch_norm + activation, which those transforms support.
        plain = not self.training or (group is None and _transformed())
        if not plain and _compiling():
            from . import _traceable  # only while dynamo traces: torch.compile(fullgraph=True) through the layer

            keep = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (input, self.weight, self.bias))
            output = _traceable.sync_batch_norm_act(
                input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                _traceable.group_name(group), description, self.activation, self.negative_slope, self.alpha,
                keep,
            )
        elif plain:
            output = F.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                                  factor, self.eps)  # type: ignore[arg-type]
            output = self._activation().forward_(output)
        else:
            _refuse_forward_ad(description, input, self.weight, self.bias)
            _refuse_functorch(description, input, self.weight, self.bias)
            output = SyncBatchNormActFunction.apply(
                input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group, description,
                self._activation(), torch.is_grad_enabled(),
            )
            if validating:
                _validate.check_backward(self, output, input, description)
        if tracks:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
        return output
