"""Converted BatchNorm subclasses behave like syncnorm.SyncBatchNorm; bad input, forward-mode AD and process groups.

A converted subclass (the generated ``Sync<Name>`` class of timm's ``BatchNormAct2d``, or of a class
of yours) goes through the same steps as ``syncnorm.SyncBatchNorm`` before its own ``forward`` runs:
validation mode, the input checks, and, in a forward that autograd recomputes inside backward
(activation checkpointing), no update of any state, the subclass's own ``num_batches_tracked``
increment included. Every case runs on real Gloo ranks against torch's float64 BatchNorm on the
whole batch, or expects the documented error on every rank with nothing changed.

Also: forward-mode AD is refused before any state changes, ``convert_model(model, process_group=g)``
applies ``g`` to layers converted before, and ``revert_model`` gives a ``torch.nn.SyncBatchNorm`` the
process group it had before the conversion.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import pytest
import test_reliability
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F
from distributed import COLLECTIVES, my_slice, rank, run_on_ranks
from reference import assert_close, check_model_against_reference
from test_reliability import _caught, _state, _unchanged
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

import syncnorm
from syncnorm import validation
from syncnorm._errors import SyncNormError


class TimmLikeBatchNorm2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d in short: counts the batch itself, F.batch_norm with its own buffers, an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        buffers = not self.training or self.track_running_stats
        y = F.batch_norm(x, self.running_mean if buffers else None, self.running_var if buffers else None,
                         self.weight, self.bias, self.training or self.running_mean is None, factor, self.eps)
        return F.silu(y)


KINDS: dict[str, Callable[[int], nn.Module]] = {
    "BatchNorm2d": nn.BatchNorm2d,  # becomes syncnorm.SyncBatchNorm: what the subclasses must match
    "timm-like": TimmLikeBatchNorm2d,
    "timm": lambda channels: BatchNormAct2d(channels, act_layer=nn.SiLU),
}
SUBCLASSES = ["timm-like", "timm"]


def _model(kind: str, channels: int = 3) -> nn.Module:
    """One converted layer named 'features', with non-trivial parameters and buffers."""
    layer = KINDS[kind](channels)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
        layer.bias.copy_(torch.linspace(-1, 1, channels))
        layer.running_mean.copy_(torch.linspace(-0.3, 0.3, channels))
        layer.running_var.copy_(torch.linspace(0.7, 1.3, channels))
    # In a dedicated world the layers use its short-timeout group; in the shared pools the default one.
    return syncnorm.convert_model(nn.Sequential(OrderedDict(features=layer)),
                                  process_group=test_reliability._SHORT_TIMEOUT_GROUP)


# --------------------------------------------------------------------------- validation mode


def rank_validation_mismatch(kind: str, case: str) -> dict[str, Any]:
    """Rank 1 differs as ``case`` says; every rank must raise a SyncNormError, nothing may change."""
    odd = rank() == 1
    channels = 4 if case == "width" and odd else 3
    model = _model(kind, channels).train(not (case == "eval" and odd))
    x = torch.randn(4, channels, 2, 2, requires_grad=True)
    before = _state(model)
    try:
        with validation():
            y = model(x)
            if case == "skipped-backward":
                before = _state(model)  # the first forward succeeded; what follows must change nothing
                if not odd:
                    y.sum().backward()
                model(x)
    except SyncNormError as error:
        return {**_caught(error), "unchanged": _unchanged(before, model)}
    return {"error": None}


def rank_validation_mismatch_plain_then(kind: str, case: str) -> list[dict[str, Any]]:
    """The case with syncnorm.SyncBatchNorm first (the expected messages), then with the converted subclass."""
    return [rank_validation_mismatch("BatchNorm2d", case), rank_validation_mismatch(kind, case)]


VALIDATION_CASES = {
    "eval": "training flag differs (rank 0: True, rank 1: False)",
    "width": "num_features differs (rank 0: 3, rank 1: 4)",
    "skipped-backward": "rank 0 in the backward of 'features', rank 1 in the forward of 'features'",
}


@pytest.mark.parametrize("case", VALIDATION_CASES)
@pytest.mark.parametrize("kind", SUBCLASSES)
def test_validation_of_a_converted_subclass_raises_what_syncbatchnorm_raises_on_every_rank(kind: str,
                                                                                         case: str) -> None:
    # The shared pool, as for SyncBatchNorm's validation tests: every rank leaves every collective cleanly.
    # (Without the checks, 'width' aborted a Gloo process and 'eval' timed out; a dedicated world,
    # test_reliability.run_dedicated, shows that in seconds, but forks ranks that import timm: too slow for the suite.)
    outcomes = run_on_ranks(2, rank_validation_mismatch_plain_then, kind, case)
    plain = [reports[0] for reports in outcomes]
    converted = [reports[1] for reports in outcomes]
    for expected, report in zip(plain, converted):
        assert expected["error"] == "SyncNormError" and VALIDATION_CASES[case] in expected["message"], expected
        assert report["error"] == "SyncNormError", report
        assert report["message"] == expected["message"]
        assert report["unchanged"]


# --------------------------------------------------------------------------- activation checkpointing


def _checkpointed_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), KINDS[kind](3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))


def rank_checkpointed_step(kind: str, reentrant: bool, x: torch.Tensor, dy: torch.Tensor, sizes: list[int],
                           state: dict[str, Any]) -> dict[str, Any]:
    model = _checkpointed_model(kind)
    model.load_state_dict(state)
    syncnorm.convert_model(model)
    xl = my_slice(x, sizes).requires_grad_()
    y = torch.utils.checkpoint.checkpoint(model, xl, use_reentrant=reentrant)
    (y * my_slice(dy, sizes)).sum().backward()
    return {"y": y.detach(), "grad_x": xl.grad, "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", SUBCLASSES)
def test_activation_checkpointing_counts_a_converted_subclass_batch_once(kind: str, reentrant: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    sizes = [3, 2]
    x = torch.randn(sum(sizes), 2, 3, 3, generator=generator) * 2 + 1
    dy = torch.randn(sum(sizes), 3, 3, 3, generator=generator)
    model = _checkpointed_model(kind)
    reports = run_on_ranks(2, rank_checkpointed_step, kind, reentrant, x, dy, sizes, model.state_dict())
    # The reference runs once, without checkpointing: num_batches_tracked 1, running stats of one step.
    check_model_against_reference(reports, model, x, dy)
    for report in reports:
        assert int(report["buffers"]["1.num_batches_tracked"]) == 1


# --------------------------------------------------------------------------- bad input


BAD_INPUTS = {
    "wrong-channels": (torch.randn(4, 1, 2, 2), ValueError, "expected 3 channels in dim 1 of the input (got 1"),
    "1-D": (torch.randn(8), ValueError, "expected input of 2 to 5 dimensions"),
    "integer": (torch.ones(4, 3, 2, 2, dtype=torch.long), TypeError, "expected a floating-point input"),
    "float8": (torch.ones(4, 3, 2, 2).to(torch.float8_e4m3fn), TypeError,
               "(float32, float64, float16 or bfloat16), got torch.float8_e4m3fn"),
}


def rank_bad_inputs_everywhere(kind: str, validate: bool) -> dict[str, dict[str, Any]]:
    """Every bad input in turn, into a fresh converted layer; what each raised, and whether anything changed."""
    reports = {}
    for bad, (x, _, _) in BAD_INPUTS.items():
        model = _model(kind)
        before = _state(model)
        COLLECTIVES.reset()
        try:
            with validation(validate):
                model(x)
        except Exception as error:  # the type is part of what the test checks
            reports[bad] = {**_caught(error), "unchanged": _unchanged(before, model), "calls": COLLECTIVES.names()}
        else:
            reports[bad] = {"error": None}
    return reports


@pytest.mark.parametrize("validate", [False, True], ids=["plain", "validating"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_into_a_converted_layer_is_refused_on_every_rank_before_any_change(kind: str,
                                                                                    validate: bool) -> None:
    for per_rank in run_on_ranks(2, rank_bad_inputs_everywhere, kind, validate):
        for bad, (_, error, text) in BAD_INPUTS.items():
            report = per_rank[bad]
            assert report["error"] == error.__name__ and text in report["message"], (bad, report)
            assert "'features'" in report["message"] and report["unchanged"], (bad, report)
            # Refused before the statistics all-reduce (the validation all-gather, if on, agreed).
            assert report["calls"] == (["all_gather"] if validate else []), (bad, report)


def test_bad_input_into_a_converted_subclass_in_eval_mode_gets_the_same_error() -> None:
    model = _model("timm").eval()
    with pytest.raises(ValueError, match="expected 3 channels in dim 1 of the input"):
        model(torch.randn(2, 1, 2, 2))


# --------------------------------------------------------------------------- forward-mode AD


def rank_forward_ad(kind: str) -> dict[str, Any]:
    model = _model(kind)
    before = _state(model)
    x = torch.randn(4, 3, 2, 2)
    COLLECTIVES.reset()
    try:
        with fwAD.dual_level():
            model(fwAD.make_dual(x, torch.randn_like(x)))
    except Exception as error:  # the type is part of what the test checks
        return {**_caught(error), "unchanged": _unchanged(before, model), "calls": COLLECTIVES.names()}
    return {"error": None}


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_mode_ad_is_refused_on_every_rank_before_any_change(kind: str) -> None:
    for report in run_on_ranks(2, rank_forward_ad, kind):
        assert report["error"] == "NotImplementedError", report
        assert "forward-mode AD" in report["message"] and "'features'" in report["message"], report
        assert report["unchanged"] and report["calls"] == [], report


def test_forward_mode_ad_without_a_process_group_is_plain_batchnorm() -> None:
    layer, reference = syncnorm.SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm1d(3, dtype=torch.float64)
    x, tangent = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent)))
        theirs = fwAD.unpack_dual(reference(fwAD.make_dual(x, tangent)))
    assert_close(ours.primal, theirs.primal, torch.float64, "output")
    assert_close(ours.tangent, theirs.tangent, torch.float64, "tangent")


# --------------------------------------------------------------------------- process groups


_GROUPS: dict[str, Any] = {}


def _singles() -> Any:
    """This rank's group of one rank (each rank then normalises its own batch)."""
    if "singles" not in _GROUPS:  # new_group is collective: every rank builds it, once per pool
        _GROUPS["singles"] = syncnorm.new_sync_groups(1)
    return _GROUPS["singles"]


def _group_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), TimmLikeBatchNorm2d(3), nn.SyncBatchNorm(3))


def rank_convert_again_with_a_group(x: torch.Tensor, dy: torch.Tensor, sizes: list[int],
                                    state: dict[str, Any]) -> dict[str, Any]:
    singles = _singles()
    model = _group_model()
    model.load_state_dict(state)
    syncnorm.convert_model(syncnorm.convert_model(model), process_group=singles)
    applied = all(model[i].process_group is singles for i in (1, 2, 3))
    xl = my_slice(x, sizes).requires_grad_()
    y = model(xl)
    (y * my_slice(dy, sizes)).sum().backward()
    return {"y": y.detach(), "grad_x": xl.grad, "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}, "applied": applied}


def test_convert_model_with_a_group_applies_it_to_layers_converted_before() -> None:
    generator = torch.Generator().manual_seed(4)
    sizes = [2, 3]
    x = torch.randn(sum(sizes), 2, 2, 2, generator=generator) * 2 + 1
    dy = torch.randn(sum(sizes), 3, 2, 2, generator=generator)
    reports = run_on_ranks(2, rank_convert_again_with_a_group, x, dy, sizes, _group_model().state_dict())
    assert all(r["applied"] for r in reports)
    # Each rank is now a group of its own: each matches the reference on its own batch alone.
    for report, part in zip(reports, (slice(0, 2), slice(2, 5))):
        check_model_against_reference([report], _group_model(), x[part], dy[part])


def rank_revert_restores_the_group(x: torch.Tensor, sizes: list[int]) -> dict[str, Any]:
    singles = _singles()
    layer = nn.SyncBatchNorm(3, process_group=singles)
    syncnorm.convert_model(layer, process_group=dist.group.WORLD)
    with torch.no_grad():
        y = layer(my_slice(x, sizes))  # the group given to convert_model: the whole world
    syncnorm.revert_model(layer)
    return {"y": y, "reverted": type(layer) is nn.SyncBatchNorm and layer.process_group is singles}


def test_revert_model_gives_torch_syncbatchnorm_back_its_own_group() -> None:
    sizes = [2, 3]
    x = torch.randn(sum(sizes), 3) * 2 + 1
    reports = run_on_ranks(2, rank_revert_restores_the_group, x, sizes)
    expected = F.batch_norm(x.double(), None, None, training=True)
    assert_close(torch.cat([r["y"] for r in reports]), expected, torch.float32, "output over the world")
    assert all(r["reverted"] for r in reports)


def _one_process_group() -> Any:
    """A distinct ProcessGroup object (of this process alone), without init_process_group."""
    return dist.ProcessGroup(dist.HashStore(), 0, 1)


def test_revert_model_restores_attributes_the_conversion_replaced() -> None:
    group_a, group_b = _one_process_group(), _one_process_group()
    layer = nn.SyncBatchNorm(3, process_group=group_a)
    syncnorm.convert_model(layer, process_group=group_b)
    assert layer.process_group is group_b
    syncnorm.revert_model(layer)
    assert type(layer) is nn.SyncBatchNorm and layer.process_group is group_a
    assert not hasattr(layer, "layer_name") and not hasattr(layer, "_syncnorm_replaced")


def test_convert_model_with_a_group_reaches_every_synchronised_layer() -> None:
    first, second = _one_process_group(), _one_process_group()
    model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3), syncnorm.SyncBatchNorm(3))
    syncnorm.convert_model(model, process_group=first)
    syncnorm.convert_model(model, process_group=second)
    assert all(layer.process_group is second for layer in model)
    syncnorm.convert_model(model)  # no group given: each keeps its own
    assert all(layer.process_group is second for layer in model)
