"""convert_model / revert_model: swap BatchNorm layers for syncnorm's and back."""

from __future__ import annotations

from typing import Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _comm
from .batchnorm import SyncBatchNorm


def convert_model(module: nn.Module, process_group: Optional[_comm.ProcessGroup] = None) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` by a syncnorm layer.

    Parameters and buffers are shared with the original layers (not copied), so an optimizer built
    before the conversion keeps working; ``requires_grad``, the training flag and devices are kept.

    Args:
        module: a model, or a single BatchNorm layer.
        process_group: the ranks whose batches are pooled (default: the whole world).

    Returns:
        The converted model (a new object only when ``module`` itself is a BatchNorm layer).

    Example:
        >>> model = torchvision.models.resnet18()
        >>> model = syncnorm.convert_model(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    return _convert(module, process_group, prefix="")


def _convert(module: nn.Module, process_group: Optional[_comm.ProcessGroup], prefix: str) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        return _to_sync(module, process_group, prefix or type(module).__name__)
    for name, child in module.named_children():
        converted = _convert(child, process_group, f"{prefix}.{name}" if prefix else name)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _to_sync(bn: _BatchNorm, process_group: Optional[_comm.ProcessGroup], name: str) -> SyncBatchNorm:
    sync = SyncBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
        device="meta", bias=bn.bias is not None,
    )
    sync.weight, sync.bias = bn.weight, bn.bias
    sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
    sync.num_batches_tracked = bn.num_batches_tracked
    sync.training = bn.training
    sync.layer_name = name
    return sync


def revert_model(module: nn.Module) -> nn.Module:
    """Replace every syncnorm layer by ``torch.nn.BatchNorm{1,2,3}d``, sharing parameters and buffers.

    Args:
        module: a model converted by ``convert_model`` (or holding SyncBatchNorm layers).

    Returns:
        The model with plain BatchNorm layers, ready for export or single-device inference.

    Example:
        >>> model = syncnorm.revert_model(model)
        >>> torch.export.export(model, (torch.randn(1, 3, 224, 224),))
    """
    if isinstance(module, SyncBatchNorm):
        bn = nn.BatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            device="meta", bias=module.bias is not None,
        )
        bn.weight, bn.bias = module.weight, module.bias
        bn.running_mean, bn.running_var = module.running_mean, module.running_var
        bn.num_batches_tracked = module.num_batches_tracked
        bn.training = module.training
        return bn
    for name, child in module.named_children():
        reverted = revert_model(child)
        if reverted is not child:
            setattr(module, name, reverted)
    return module


