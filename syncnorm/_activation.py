"""An invertible activation as data: the one ``SyncBatchNormAct`` applies after BatchNorm, and what its backward needs.

``Activation`` is the activation's in-place forward, its inverse and its derivative, all read from the
output ``y``: with them the training step keeps only ``y`` and recovers ``z = act^-1(y)`` and
``xhat = (z - bias) / weight`` in backward (In-Place Activated BatchNorm, Rota Bulo et al., CVPR 2018).
``fallback_channels`` chooses the channels whose ``xhat`` cannot be recovered accurately (a zero or
tiny weight, a bias much larger than the weight, ELU deep in its flat tail): those keep their input.
The step itself (statistics, all-reduces, the backward on ``z``) is ``_function``'s.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _stats

ACTIVATIONS = ("leaky_relu", "elu", "identity")

# How many units of the output dtype's rounding the inversion may cost a channel's recovered xhat
# (absolute, on xhat of order 1; see fallback_channels). float32: 64 u = 64 * 2^-24 ~ 4e-6, a
# fraction of float32's tolerances (1e-5) and of what the gradient's own float32 arithmetic costs
# at |xhat| ~ 10. float16/bfloat16 keep 11/8 bits: 4 u costs 2 of them, as much as rounding twice.
_MAX_LOSS = {torch.float64: 64.0, torch.float32: 64.0, torch.float16: 4.0, torch.bfloat16: 4.0}


# Below this |weight| a channel keeps its input whatever K says: the backward's 1 / weight^2 stays < 2^100.
_MIN_WEIGHT = 2.0**-50


class Activation:
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
            # -inf: such a channel is never inverted (fallback_channels), so the value does not matter.
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


def fallback_channels(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: Activation,
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


def fallback_index(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: Activation,
                   dtype: torch.dtype) -> Tensor:
    """``fallback_channels`` as an index tensor, empty where nothing must be kept (the traced path's custom op)."""
    index = fallback_channels(y, weight, bias, activation, dtype)
    return torch.empty(0, dtype=torch.long, device=y.device) if index is None else index


@torch.library.custom_op("syncnorm::act_fallback_channels", mutates_args=())
def fallback_index_op(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: str,
                      negative_slope: float, alpha: float, dtype: torch.dtype) -> Tensor:
    """``fallback_index`` as a custom op for torch.compile: its fake returns an index of unbacked size.

    The choice is data-dependent (a nonzero, one host sync), and so stays inside the graph instead of breaking it.
    """
    return fallback_index(y, weight, bias, Activation(activation, negative_slope, alpha), dtype)


@fallback_index_op.register_fake
def _(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], activation: str, negative_slope: float,
      alpha: float, dtype: torch.dtype) -> Tensor:
    return y.new_empty((torch.library.get_ctx().new_dynamic_size(max=y.shape[1]),), dtype=torch.long)
