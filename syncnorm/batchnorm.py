"""The syncnorm layers' one base, ``SyncNormLayer``, and ``syncnorm.SyncBatchNorm``, the module users see.

``SyncNormLayer`` owns what every syncnorm layer does around its step: the input checks (before any
collective), validation mode, the statistics group, the momentum factor and which buffers a step updates,
activation checkpointing's recomputed forward, and the batch counter; the step itself is
``_function.sync_batch_norm``. ``SyncBatchNorm`` and ``SyncBatchNormAct`` (``activation``) are that base
with a name (and an activation); ``is_syncnorm_layer`` is the one membership test.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import _comm, _validate
from ._function import ActivationSpec, compiling_now, sync_batch_norm


class SyncNormMixin:
    """What every syncnorm layer is, whatever its BatchNorm class: the membership mark, its name in messages, and
    the beginning of a step (validation, input checks, statistics group, recompute flag).

    ``SyncNormLayer`` (``SyncBatchNorm``, ``SyncBatchNormAct``) and the classes ``convert_model`` generates for
    user subclasses inherit it; ``is_syncnorm_layer`` asks for it.
    """

    _KIND: ClassVar[str] = "syncnorm layer"
    # Qualified name in the model, for error messages; convert_model sets it.
    layer_name: Optional[str] = None
    num_features: int
    training: bool
    process_group: Optional[_comm.ProcessGroup]

    def _describe(self) -> str:
        name = f" '{self.layer_name}'" if self.layer_name else ""
        return f"{self._KIND}{name} (num_features={self.num_features})"

    def _begin_step(self, input: Any) -> tuple[str, bool, Optional[_comm.ProcessGroup], bool]:
        """The first steps of every syncnorm forward: (description, validating, statistics group, recomputing).

        Validation comes first, so a bad input on one rank raises on every rank, not only there; then the
        input checks, on every rank, before the layer's own code and before any collective. The group is None
        in eval mode and where nobody else takes part; ``recomputing``: autograd re-runs a checkpointed
        forward inside backward (it synchronises again but counts nothing).
        """
        description = self._describe()
        validating = begin_forward(self, input, description)  # type: ignore[arg-type]
        group = _comm.statistics_group(self.process_group, description) if self.training else None
        return description, validating, group, recomputing_forward()


class SyncNormLayer(SyncNormMixin, _BatchNorm):
    """The base of syncnorm's own layers: BatchNorm's arguments, buffers and prologue, the step synchronised.

    A subclass names itself (``_KIND``) and may add an activation (``_activation_spec``); the training step
    is ``_function.sync_batch_norm`` for all of them.
    """

    # The input's number of dimensions at the last forward (revert_model picks BatchNorm1d/2d/3d by it).
    last_input_dim: Optional[int] = None

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
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        # A DeviceMesh is resolved here, on every rank, never in a forward (an N-D mesh's group is collective).
        self.process_group = _comm.resolve_group(process_group, self._KIND)
        self.layer_name = None
        self.last_input_dim = None

    def _activation_spec(self) -> ActivationSpec:
        """The activation after the normalisation, as the step takes it (None: plain BatchNorm)."""
        return None

    def _check_input_dim(self, input: Tensor) -> None:
        """Reject bad input on every rank before any collective, with what was expected and how to fix it."""
        check_input(input, self.num_features, self._describe())

    def forward(self, input: Tensor) -> Tensor:
        if self.training and compiling_now() and _comm.distributed_ready() and _validate.enabled():
            # Validation's all-gathers are not traceable: in validation mode a training forward under
            # torch.compile runs eagerly (one graph break here). Otherwise it is traced whole.
            return _run_eagerly(self._forward, input)
        return self._forward(input)

    def _forward(self, input: Tensor) -> Tensor:
        description, validating, group, recomputing = self._begin_step(input)
        # Remembered so that revert_model can pick BatchNorm1d/2d/3d for a layer built as SyncBatchNorm.
        # (Not while compiling: dynamo rejects an attribute write inside a checkpointed region.)
        if not compiling_now() and self.last_input_dim != input.dim():  # written once (__setattr__ is slow)
            self.last_input_dim = input.dim()
        # A recomputed forward (activation checkpointing) recomputes a batch already counted: it still
        # synchronises (every rank recomputes), but updates nothing. (A compiled graph recomputes inside its
        # own backward, without running this code again.)
        tracks = (
            self.training and self.track_running_stats and self.num_batches_tracked is not None and not recomputing
        )
        if self.momentum is None:
            # Cumulative average: this batch's weight, once it is counted.
            factor: float | Tensor = 0.0
            if tracks and compiling_now():  # the same value as a tensor: no host sync in the graph
                factor = (self.num_batches_tracked + 1).double().reciprocal()  # type: ignore[operator, union-attr]
            elif tracks:
                factor = 1.0 / float(self.num_batches_tracked + 1)  # type: ignore[operator]
        else:
            factor = self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        uses_buffers = not self.training or (self.track_running_stats and not recomputing)
        output = sync_batch_norm(
            input, self.running_mean if uses_buffers else None, self.running_var if uses_buffers else None,
            self.weight, self.bias, use_batch_stats, factor, self.eps, group=group, layer=description,
            activation=self._activation_spec(),
        )
        if validating and group is not None:
            _validate.check_backward(self, output, input, description)
        # Counted only once the step succeeded, so a failed step leaves the layer as it was.
        if tracks:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
        return output


class SyncBatchNorm(SyncNormLayer):
    r"""BatchNorm whose training statistics are those of the batch of every rank together.

    A drop-in for ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``: same arguments,
    parameters, buffers, ``state_dict`` keys and ``repr``, so checkpoints load both ways with
    ``strict=True``. In training mode on W ranks it computes exactly what one process would compute
    on the concatenation of the W batches (output, input gradient, running statistics), with one
    all-reduce of 2C+1 float64 values in forward (two, of C+1 and 2C+1, for float64 input) and one of
    2C values in backward. It runs on CPU tensors (Gloo) and CUDA tensors (NCCL or Gloo).

    Like torch's BatchNorm, its results are a function of its parameters, its buffers (the state_dict),
    its input and its process group: it keeps nothing else between steps, so a resumed, deep-copied,
    reloaded or regrouped layer continues exactly as the one that trained.

    It does not communicate in eval mode, without an initialised process group, or in a group of
    one rank: there it is plain BatchNorm. In eval mode with ``track_running_stats=False`` each rank
    normalises with its own batch, as ``torch.nn.SyncBatchNorm`` does.

    The weight and bias gradients are this rank's share; DistributedDataParallel sums (averages)
    them across ranks like those of any other parameter.

    Most models get it from ``syncnorm.convert_model``; ``SyncBatchNorm.convert_sync_batchnorm`` is an
    alias of it, so code written for ``torch.nn.SyncBatchNorm`` works after changing the import.

    Args:
        num_features: number of channels C.
        eps: added to the variance for numerical stability.
        momentum: factor of the running averages; None for a cumulative average.
        affine: whether the layer has a learnable weight (and bias).
        track_running_stats: whether to keep running_mean/running_var/num_batches_tracked.
        process_group: the ranks whose batches are pooled (default: the whole world): a ProcessGroup,
            or a DeviceMesh (``mesh["dp"]``; an N-D mesh pools all of its ranks); the attribute
            ``process_group`` holds the resolved ProcessGroup. See ``syncnorm.new_sync_groups`` to
            synchronise within subsets of ranks.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: whether an affine layer has a bias.

    Shape:
        - Input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); channels_last kept.
        - Output: same shape, dtype and memory format as the input.

    Raises:
        TypeError: a ``process_group`` that is neither a ProcessGroup nor a DeviceMesh.
        ValueError: a DeviceMesh ``process_group`` that does not contain this rank.
        ValueError: from ``forward``: an input of fewer than 2 or more than 5 dimensions, or whose dim 1
            is not ``num_features``; ``eps <= 0`` in training mode; a global batch of one value per
            channel ("Expected more than 1 value per channel when training", on every rank). The input
            checks run before any collective; none of these changes any state.
        TypeError: from ``forward``: an input that is not a tensor, or of a dtype other than float32,
            float64, float16 or bfloat16 (integers, complex, float8).
        NotImplementedError: forward-mode AD (dual tensors) through a synchronised training forward.
        SyncNormError: a problem between ranks, naming the layer: an all-reduce that failed or timed out
            (a peer died or skipped the layer), this process not in ``process_group``, ranks that differ
            in validation mode, or a double backward (``create_graph=True``) through the layer.

    Example:
        >>> bn = syncnorm.SyncBatchNorm(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))  # on every rank, after init_process_group
        >>> y.shape
        torch.Size([8, 64, 32, 32])
    """

    _KIND: ClassVar[str] = "syncnorm.SyncBatchNorm"

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with the statistics of the global batch (training) or the running ones (eval).

        In training mode every rank of the process group must call it (the one all-reduce is collective);
        it updates the running statistics with the global mean and the unbiased global variance. In eval
        mode, without a process group, or in a group of one rank it is ``torch.nn.BatchNorm2d.forward``.

        Args:
            input: this rank's batch; it may hold zero samples, and ranks' batch sizes may differ.

        Returns:
            The normalised tensor, of the input's shape, dtype and memory format.

        Raises:
            ValueError: a bad input (dimensions, channels), ``eps <= 0``, or a global count of 1.
            TypeError: an input that is not a floating tensor of a dtype the kernels take.
            SyncNormError: a problem between ranks (see the class).

        Shape:
            - Input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W).
            - Output: same as the input.

        Example:
            >>> bn = syncnorm.SyncBatchNorm(3)
            >>> bn(torch.randn(4, 3, 8, 8)).shape
            torch.Size([4, 3, 8, 8])
        """
        return super().forward(input)

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: _comm.GroupOrMesh = None
    ) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm's API: the same as ``syncnorm.convert_model(module, process_group)``.

        Args:
            module: a model, or a single BatchNorm layer.
            process_group: the ranks whose batches are pooled (default: the whole world).

        Returns:
            ``module`` itself, converted in place.

        Example:
            >>> model = syncnorm.SyncBatchNorm.convert_sync_batchnorm(model)  # was torch.nn.SyncBatchNorm
        """
        # Imported here: convert imports this module (the package's one import inside a function, tested).
        from .convert import convert_model

        return convert_model(module, process_group)


def is_syncnorm_layer(module: Any) -> bool:
    """Whether ``module`` is a syncnorm layer: SyncBatchNorm (subclasses too), SyncBatchNormAct, a generated Sync<Name>.

    The one membership test: convert, revert, joinable, precise-BN and Lightning all ask it.
    """
    return isinstance(module, SyncNormMixin) and isinstance(module, _BatchNorm)


# The dtypes the kernels take; anything else (float8, integers, complex) is refused before any collective.
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_input(input: Any, num_features: int, layer: str) -> None:
    """``SyncBatchNorm._check_input_dim`` for any syncnorm layer (converted subclasses too); ``layer`` names it."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{layer} expected a torch.Tensor, got {type(input).__name__}.")
    if not 2 <= input.dim() <= 5:
        hint = "; add a batch dimension" if input.dim() < 2 else "; fold extra dimensions into the last ones"
        raise ValueError(
            f"{layer} expected input of 2 to 5 dimensions (N, C, ...) "
            f"(got a {input.dim()}-D tensor of shape {tuple(input.shape)}){hint}."
        )
    if input.shape[1] != num_features:
        raise ValueError(
            f"{layer} expected {num_features} channels in dim 1 of the input "
            f"(got {input.shape[1]}, input shape {tuple(input.shape)}); build the layer with "
            f"num_features={input.shape[1]} or feed it channels-first (N, C, ...) input."
        )
    if input.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"{layer} expected a floating-point input of a dtype its kernels take (float32, float64, float16 "
            f"or bfloat16), got {input.dtype}; convert it with .float()."
        )


def begin_forward(layer: _BatchNorm, input: Any, description: str) -> bool:
    """The first steps of every syncnorm forward (converted subclasses too); whether validation mode is on.

    Validation comes first, so a bad input on one rank raises on every rank, not only there; then the
    input checks, on every rank, before the layer's own code and before any collective.
    """
    validating = _validate.enabled()
    if validating:
        _validate.check_forward(layer, input, description)
    if isinstance(layer, SyncNormLayer):
        layer._check_input_dim(input)  # a subclass may override it
    else:
        check_input(input, layer.num_features, description)
    return validating


def recomputing_forward() -> bool:
    """Whether this forward is autograd re-running a checkpointed forward inside backward (count nothing)."""
    return not compiling_now() and _inside_backward()


def _call(fn: Callable[..., Tensor], *args: Any) -> Tensor:
    return fn(*args)


# Disabled for dynamo lazily (torch._disable_dynamo imports torch._dynamo on the first call, which happens
# only while compiling), so that importing syncnorm does not import dynamo. Older torch: traced as is.
_run_eagerly: Callable[..., Tensor] = getattr(torch, "_disable_dynamo", lambda fn: fn)(_call)


def _inside_backward() -> bool:
    """Whether autograd is running a backward pass right now (a checkpointed forward being recomputed)."""
    current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return current_graph_task_id is not None and current_graph_task_id() != -1
