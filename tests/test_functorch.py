"""torch.func transforms (grad, vmap) through syncnorm layers.

A synchronised training forward is refused under a torch.func transform with an error that names
syncnorm and the layer and says what works instead, before anything changes (parameters, running
statistics, ``num_batches_tracked``) and before any collective, on every rank; the next ordinary
training step is then exact against torch's float64 BatchNorm on the whole batch. Where a layer is
plain batch_norm (no process group, a group of one rank), torch.func works and gives torch's
BatchNorm gradients.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from distributed import COLLECTIVES, my_slice, run_on_ranks, use_kernels
from reference import assert_close, check_model_against_reference
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

import syncnorm

NORMS: dict[str, Callable[..., nn.Module]] = {
    "BatchNorm2d": nn.BatchNorm2d,  # becomes syncnorm.SyncBatchNorm
    "timm": BatchNormAct2d,  # becomes a generated SyncBatchNormAct2d, which counts num_batches_tracked itself
}


def _model(norm: str, track_running_stats: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    """conv -> BatchNorm -> activation -> linear; ``"fused"``: BatchNorm2d and a leaky ReLU, which
    ``convert_model(fuse_activation=True)`` turns into one syncnorm.SyncBatchNormAct."""
    torch.manual_seed(0)
    fused = norm == "fused"
    bn = NORMS["BatchNorm2d" if fused else norm](4, track_running_stats=track_running_stats)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), bn, nn.LeakyReLU(0.1) if fused else nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
    ).to(dtype)


def _meta_loss(model: nn.Module) -> Callable[..., torch.Tensor]:
    """MAML's inner loss: the model as a function of its parameters."""

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), target)

    return loss


def _apply(transform: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Any:
    if transform == "grad":
        params = {n: p.detach() for n, p in model.named_parameters()}
        return torch.func.grad(_meta_loss(model))(params, x, target)
    return torch.func.vmap(model)(torch.stack([x, 2 * x]))  # two tasks at once


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rank_transform_is_refused(kernels: str, *args: Any) -> dict[str, Any]:
    with use_kernels(kernels):
        return _transform_is_refused(*args)


def _transform_is_refused(transform: str, norm: str, track: bool, state: dict[str, Any], x: torch.Tensor,
                          target: torch.Tensor, dy: torch.Tensor, sizes: list[int]) -> dict[str, Any]:
    model = syncnorm.convert_model(_model(norm, track), fuse_activation=norm == "fused")
    assert norm != "fused" or type(model[1]) is syncnorm.SyncBatchNormAct
    model.load_state_dict(state)
    before = _state(model)
    COLLECTIVES.reset()
    report: dict[str, Any] = {"error": None}
    try:
        _apply(transform, model, my_slice(x, sizes), my_slice(target, sizes))
    except Exception as error:  # the type is part of what the test checks
        report = {"error": type(error).__name__, "message": str(error)}
    after = model.state_dict()
    report["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    report["calls"] = COLLECTIVES.names()
    # The layer still works: an ordinary training step, synchronised.
    xl = my_slice(x, sizes).requires_grad_()
    y = model(xl)
    (y * my_slice(dy, sizes)).sum().backward()
    return {**report, "y": y.detach(), "grad_x": xl.grad, "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


@pytest.mark.parametrize("kernels", ["native", "fused"])
@pytest.mark.parametrize("norm", [*NORMS, "fused"])
@pytest.mark.parametrize(("transform", "track"), [("grad", False), ("vmap", True)],
                         ids=["grad-maml-no-running-stats", "vmap-running-stats"])
def test_a_transform_through_a_synchronised_forward_is_refused_on_every_rank_before_any_change(
    transform: str, track: bool, norm: str, kernels: str
) -> None:
    generator = torch.Generator().manual_seed(1)
    sizes = [3, 2]
    x = torch.randn(5, 3, 3, 3, generator=generator) * 2 + 1
    target = torch.randint(0, 2, (5,), generator=generator)
    dy = torch.randn(5, 2, generator=generator)
    model = _model(norm, track)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5, generator=generator)
    reports = run_on_ranks(2, rank_transform_is_refused, kernels, transform, norm, track, model.state_dict(), x, target,
                           dy, sizes)
    for report in reports:
        assert report["error"] in ("NotImplementedError", "SyncNormError"), report["error"]
        message = report["message"]
        assert "syncnorm" in message and "'1'" in message and "torch.func" in message, message
        assert "eval()" in message and "without a process group" in message and "backward" in message, message
        assert report["unchanged"] and report["calls"] == [], report
    check_model_against_reference(reports, model, x, dy)


def _grads_against_torch(transform: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                         group: Any = None) -> None:
    """torch.func through ``model`` converted (plain batch_norm here) against torch's BatchNorm, float64."""
    reference = copy.deepcopy(model)
    syncnorm.convert_model(model, process_group=group)
    ours = _apply(transform, model, x, target)
    if transform == "grad":
        # The independent oracle: reverse mode through torch's own BatchNorm.
        F.cross_entropy(reference(x), target).backward()
        for name, p in reference.named_parameters():
            assert_close(ours[name], p.grad, torch.float64, name)
    else:
        for task, xt in enumerate((x, 2 * x)):
            assert_close(ours[task], reference(xt), torch.float64, f"task {task}")


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_a_transform_without_a_process_group_is_torch_batchnorm(transform: str, norm: str) -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 3, 3, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 2, (6,), generator=generator)
    _grads_against_torch(transform, _model(norm, False, torch.float64), x, target)


_SINGLES: list[Any] = []


def rank_transform_in_a_group_of_one_rank(norm: str, x: torch.Tensor, target: torch.Tensor,
                                          sizes: list[int]) -> None:
    if not _SINGLES:  # new_group is collective: every rank builds it, once per pool
        _SINGLES.append(syncnorm.new_sync_groups(1))
    COLLECTIVES.reset()
    _grads_against_torch("grad", _model(norm, False, torch.float64), my_slice(x, sizes), my_slice(target, sizes),
                         _SINGLES[0])
    assert COLLECTIVES.names() == []


def test_grad_in_a_group_of_one_rank_is_torch_batchnorm_on_the_local_batch() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 3, 3, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 2, (7,), generator=generator)
    run_on_ranks(2, rank_transform_in_a_group_of_one_rank, "timm", x, target, [3, 4])
