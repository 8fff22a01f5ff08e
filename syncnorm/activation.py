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

That backward is ``_function.activation_backward_gradients``: BatchNorm's backward
(``_function.backward_gradients``) of an input ``z`` with the bias as its mean and ``1 / weight`` as its
invstd (so its ``xhat`` is this layer's), scaled by ``alpha = weight invstd``, through the kernel backend
of the step (``native`` or ``fused``, ``_backends``); the inversion (``_activation.Activation``) is aten
ops on every backend. Its all-reduce sums ``[sum dz, sum dz xhat]``, the same quantities on every rank.
The forward is ``SyncBatchNorm``'s (the same Function, ``_function.SyncBatchNormFunction``, the same
all-reduce and count check), then the activation in place.

Where the inversion is not accurate (``_activation.fallback_channels``: a zero or tiny weight, a bias
much larger than the weight, ELU deep in its flat tail) the layer also keeps those channels' input (and
only those), so every channel's gradients are exact. While a CUDA graph is captured it keeps the whole
input instead (that choice is a host read). The layer is ``batchnorm.SyncNormLayer`` with an activation:
its prologue, checks and running statistics are ``SyncBatchNorm``'s.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor

from . import _comm
from ._activation import ACTIVATIONS, Activation
from ._function import ActivationSpec
from .batchnorm import SyncNormLayer


class SyncBatchNormAct(SyncNormLayer):
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

    _KIND: ClassVar[str] = "syncnorm.SyncBatchNormAct"

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
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {Activation(*self._spec())!r}"

    def _spec(self) -> tuple[str, float, float]:
        return (self.activation, self.negative_slope, self.alpha)

    def _activation_spec(self) -> ActivationSpec:
        return self._spec()

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
        return super().forward(input)
