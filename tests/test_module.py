"""Single-process behaviour of syncnorm.SyncBatchNorm: API parity with torch's BatchNorm, errors, no communication."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reference import assert_close
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncnorm


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False},
                                    {"eps": 1e-3, "momentum": None}], ids=str)
def test_same_parameters_buffers_state_dict_and_repr_as_batchnorm2d(kwargs: dict[str, Any]) -> None:
    ours, theirs = syncnorm.SyncBatchNorm(7, **kwargs), nn.BatchNorm2d(7, **kwargs)
    assert isinstance(ours, _BatchNorm)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert repr(ours).replace("SyncBatchNorm", "BatchNorm2d") == repr(theirs)


def test_checkpoints_load_both_ways_strictly() -> None:
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(5)
    theirs(torch.randn(8, 5, 3, 3) * 2 + 1)  # non-trivial running statistics
    ours = syncnorm.SyncBatchNorm(5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (6, 3, 4, 4), (6, 3, 2, 3, 4)], ids=lambda s: f"{len(s)}D")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_without_process_group_it_is_plain_batchnorm(shape: tuple[int, ...], training: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    ours = syncnorm.SyncBatchNorm(3, dtype=torch.float64).train(training)
    theirs = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](
        3, dtype=torch.float64).train(training)
    for _ in range(2):
        assert_close(ours(x), theirs(x), torch.float64, "output")
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


BAD_INPUTS = {
    "1D": (torch.randn(8), ValueError, "expected input of 2 to 5 dimensions"),
    "6D": (torch.randn(2, 3, 1, 1, 1, 2), ValueError, "expected input of 2 to 5 dimensions"),
    "wrong-channels": (torch.randn(4, 5, 2), ValueError, "expected 3 channels"),
    "integer": (torch.ones(4, 3, dtype=torch.long), TypeError, "expected a floating-point input"),
    "complex": (torch.ones(4, 3, dtype=torch.complex64), TypeError, "expected a floating-point input"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_with_a_message_and_no_state_change(bad: tuple[torch.Tensor, type, str]) -> None:
    x, error, text = bad
    bn = syncnorm.SyncBatchNorm(3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(error, match=text):
        bn(x)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())


def test_single_value_per_channel_raises_like_batchnorm_and_changes_nothing() -> None:
    bn = syncnorm.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 3))
    assert int(bn.num_batches_tracked) == 0


def test_non_positive_eps_is_refused_in_training() -> None:
    with pytest.raises(ValueError, match="eps must be positive"):
        syncnorm.SyncBatchNorm(3, eps=0.0)(torch.randn(4, 3))


def test_convert_sync_batchnorm_alias() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    converted = syncnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], syncnorm.SyncBatchNorm)
