"""What the frameworks' own BatchNorm tools do with syncnorm layers, and why they are not torch.nn.SyncBatchNorm.

The decision: ``syncnorm.SyncBatchNorm`` and the generated ``Sync<Name>`` classes are ``_BatchNorm``
subclasses but NOT subclasses of ``torch.nn.SyncBatchNorm``. The reason is the first test:
DistributedDataParallel refuses any ``torch.nn.SyncBatchNorm`` instance in a CPU module ("SyncBatchNorm
layers only work with GPU modules"), which would end syncnorm's CPU/Gloo use. What follows from it is
tested here: the frameworks' "revert SyncBatchNorm" helpers (mmengine, Lightning) leave syncnorm layers
as they are (they stay correct single-process BatchNorms), torch's and mmengine's converters replace
them like any BatchNorm, and timm's freezing helper freezes a generated ``Sync<Name>`` of its own classes
but not a ``syncnorm.SyncBatchNorm`` (freeze before converting, or revert first).
"""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from distributed import run_on_ranks
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

import syncnorm


class AlsoTorchSyncBatchNorm(syncnorm.SyncBatchNorm, nn.SyncBatchNorm):
    """The rejected design: a syncnorm layer that is also an instance of torch.nn.SyncBatchNorm."""


def model_with_both_kinds() -> nn.Sequential:
    """A plain BatchNorm2d (becomes syncnorm.SyncBatchNorm) and a timm BatchNormAct2d (becomes SyncBatchNormAct2d)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act_layer=nn.ReLU)
    )


def test_syncnorm_layers_are_batchnorms_but_not_torch_sync_batchnorm() -> None:
    model = syncnorm.convert_model(model_with_both_kinds())
    plain, generated = model[1], model[3]
    assert type(plain) is syncnorm.SyncBatchNorm and type(generated).__name__ == "SyncBatchNormAct2d"
    for layer in (plain, generated, syncnorm.SyncBatchNorm(4)):
        assert isinstance(layer, _BatchNorm)
        assert not isinstance(layer, nn.SyncBatchNorm)
    assert isinstance(generated, BatchNormAct2d)  # so code that knows timm's class still knows it


def rank_wrap_in_ddp(layer_class: str) -> str:
    model = model_with_both_kinds().double()
    if layer_class == "syncnorm":
        syncnorm.convert_model(model)
    else:
        model[1].__class__ = AlsoTorchSyncBatchNorm
        model[1].process_group, model[1].layer_name, model[1].last_input_dim = None, None, None
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
    except ValueError as error:
        return str(error)
    ddp(torch.randn(4, 3, 6, 6, dtype=torch.float64)).sum().backward()
    return "trained"


@pytest.mark.parametrize("layer_class", ["syncnorm", "also_torch_sync"])
def test_ddp_on_cpu_refuses_torch_sync_batchnorm_instances_so_syncnorm_is_not_one(layer_class: str) -> None:
    outcomes = run_on_ranks(2, rank_wrap_in_ddp, layer_class)
    if layer_class == "syncnorm":
        assert outcomes == ["trained", "trained"]
    else:
        assert all("SyncBatchNorm layers only work with GPU modules" in outcome for outcome in outcomes)


def same_layers(before: list[nn.Module], model: nn.Module) -> bool:
    return [id(m) for m in before] == [id(m) for m in model.modules()]


def test_mmengine_revert_sync_batchnorm_leaves_syncnorm_layers_as_they_are() -> None:
    from mmengine.model import revert_sync_batchnorm

    model = syncnorm.convert_model(model_with_both_kinds())
    layers = list(model.modules())
    classes = [type(m) for m in layers]
    reverted = revert_sync_batchnorm(model)
    assert reverted is model and same_layers(layers, model) and [type(m) for m in model.modules()] == classes
    # Outside a process group they are plain BatchNorms: the single-process run mmengine wanted.
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(model(x), model_with_both_kinds()(x), atol=1e-6, rtol=1e-6)


def test_mmengine_batchnormxd_from_reverted_torch_sync_batchnorm_converts_and_reverts() -> None:
    from mmengine.model import revert_sync_batchnorm

    torch_sync = revert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    xd = type(torch_sync[1])
    assert xd.__name__ == "_BatchNormXd"
    syncnorm.convert_model(torch_sync)
    assert type(torch_sync[1]).__name__ == "Sync_BatchNormXd" and isinstance(torch_sync[1], xd)
    assert type(syncnorm.revert_model(torch_sync)[1]) is xd


def test_mmengine_and_torch_converters_replace_syncnorm_layers_with_torch_sync_batchnorm() -> None:
    from mmengine.model import convert_sync_batchnorm as mmengine_convert

    for convert in (nn.SyncBatchNorm.convert_sync_batchnorm, mmengine_convert):
        model = syncnorm.convert_model(model_with_both_kinds())
        weight = model[1].weight
        converted = convert(model)
        assert type(converted[1]) is nn.SyncBatchNorm and converted[1].weight is weight


def test_lightning_torch_sync_batchnorm_revert_leaves_syncnorm_layers_as_they_are() -> None:
    from pytorch_lightning.plugins import TorchSyncBatchNorm

    model = syncnorm.convert_model(model_with_both_kinds())
    layers = list(model.modules())
    classes = [type(m) for m in layers]
    reverted = TorchSyncBatchNorm().revert(model)
    assert same_layers(layers, reverted) and [type(m) for m in reverted.modules()] == classes


def test_timm_freeze_batch_norm_2d_freezes_generated_layers_but_not_syncnorm_batchnorm() -> None:
    from timm.layers import freeze_batch_norm_2d

    frozen = freeze_batch_norm_2d(syncnorm.convert_model(model_with_both_kinds()))
    assert type(frozen[1]) is syncnorm.SyncBatchNorm  # not a BatchNorm2d nor a torch.nn.SyncBatchNorm
    assert type(frozen[3]) is FrozenBatchNormAct2d
    # The recipe: freeze first; convert_model leaves frozen layers alone (their statistics are fixed).
    model = syncnorm.convert_model(freeze_batch_norm_2d(model_with_both_kinds()))
    assert type(model[1]) is FrozenBatchNorm2d and type(model[3]) is FrozenBatchNormAct2d


def rank_timm_recipe_step(x: torch.Tensor) -> dict[str, Any]:
    from distributed import rank

    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3).double()
    oracle = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3).double()
    oracle.load_state_dict(model.state_dict())
    model = syncnorm.convert_model(model)  # timm train.py --sync-bn, with the one-line change
    ddp = nn.parallel.DistributedDataParallel(model)
    half = x.shape[0] // 2
    F.mse_loss(ddp(x[rank() * half:(rank() + 1) * half]), torch.ones(half, 3, dtype=x.dtype)).backward()
    F.mse_loss(oracle(x), torch.ones(x.shape[0], 3, dtype=x.dtype)).backward()
    worst = 0.0
    for got, want in zip(model.parameters(), oracle.parameters()):
        worst = max(worst, float((got.grad - want.grad).abs().max()))  # type: ignore[operator]
    for got, want in zip(model.buffers(), oracle.buffers()):
        worst = max(worst, float((got.double() - want.double()).abs().max()))
    generated = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Sync")})
    return {"worst": worst, "generated": generated}


def test_timm_sync_bn_recipe_on_two_cpu_ranks_matches_one_process() -> None:
    # timm's own converter (what train.py --sync-bn runs) makes torch SyncBatchNorm subclasses: CPU DDP refuses them.
    converted = timm.layers.convert_sync_batchnorm(model_with_both_kinds())
    assert isinstance(converted[3], SyncBatchNormAct) and isinstance(converted[3], nn.SyncBatchNorm)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for outcome in run_on_ranks(2, rank_timm_recipe_step, x):
        assert outcome["generated"] == ["SyncBatchNormAct2d"]
        assert outcome["worst"] < 1e-10
