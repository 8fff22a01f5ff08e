"""Checkpoints: train on 4 ranks, save from any one rank, resume on 2 ranks or on 1 process, as if never stopped.

The running statistics come from the same all-reduced buffer on every rank, so every rank holds
bit-identical buffers (and, with gradients summed over ranks, identical parameters): any rank's
checkpoint is THE checkpoint. The oracle trains torch's own BatchNorm model in float64, in one
process, on the whole global batch of every step, with the same optimizer.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist
from distributed import run_on_ranks
from reference import assert_close
from torch import nn

import syncnorm

STEPS_BEFORE, STEPS_AFTER = 3, 3
LR, MOMENTUM = 0.05, 0.9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5, momentum=None),
    )


def _batches() -> list[dict[str, torch.Tensor]]:
    """The global batch of every step, the same whatever the number of ranks."""
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(8, 2, 4, 4, generator=generator) * 2 + 0.5,
             "target": torch.randn(8, 5, generator=generator)} for _ in range(STEPS_BEFORE + STEPS_AFTER)]


SPLITS = {4: [3, 0, 2, 3], 2: [5, 3], 1: [8]}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def rank_train(checkpoint: bytes, first_step: int, steps: int) -> dict[str, Any]:
    """Load ``checkpoint`` (model and optimizer), train ``steps`` steps on this rank's slices, save again."""
    distributed = dist.is_initialized()
    world, me = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    model = syncnorm.convert_model(_model())
    optimizer = _optimizer(model)
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    model.train()
    batches = _batches()
    for step in range(first_step, first_step + steps):
        x = batches[step]["x"].split(SPLITS[world])[me]
        target = batches[step]["target"].split(SPLITS[world])[me]
        optimizer.zero_grad()
        # This rank's share of the mean loss over the global batch: the shares' gradients sum to its gradient.
        loss = (model(x) - target).square().sum() / batches[step]["x"].shape[0]
        loss.backward()
        if distributed:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        optimizer.step()
    return {"checkpoint": _save(model, optimizer), "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _save(model: nn.Module, optimizer: torch.optim.Optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    return buffer.getvalue()


def _reference_states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bytes]:
    """torch's BatchNorm model in float64 on whole batches: its state after the first and after all steps."""
    fresh = _model()
    initial = _save(fresh, _optimizer(fresh))
    model = _model().double()
    optimizer = _optimizer(model)
    states = []
    for batch in _batches():
        optimizer.zero_grad()
        loss = (model(batch["x"].double()) - batch["target"].double()).square().sum() / batch["x"].shape[0]
        loss.backward()
        optimizer.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states[STEPS_BEFORE - 1], states[-1], initial


def _assert_state_close(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert int(state[key]) == int(value), (what, key)
        else:
            assert_close(state[key], value, torch.float32, f"{what} {key}")


def test_train_on_four_ranks_resume_on_two_and_on_one_like_the_reference() -> None:
    at_save, at_end, initial = _reference_states()
    before = run_on_ranks(4, rank_train, initial, 0, STEPS_BEFORE)
    # Every rank's checkpoint is the same, bit for bit: saving on any one rank is enough.
    for r in before[1:]:
        for key, value in before[0]["state"].items():
            assert torch.equal(r["state"][key], value), key
    _assert_state_close(before[0]["state"], at_save, "saved on 4 ranks")

    saved_on_rank_3 = before[3]["checkpoint"]
    on_two = run_on_ranks(2, rank_train, saved_on_rank_3, STEPS_BEFORE, STEPS_AFTER)
    for r in on_two:
        _assert_state_close(r["state"], at_end, "resumed on 2 ranks")
    assert all(torch.equal(on_two[1]["state"][k], v) for k, v in on_two[0]["state"].items())

    on_one = rank_train(before[1]["checkpoint"], STEPS_BEFORE, STEPS_AFTER)  # one process, no process group
    _assert_state_close(on_one["state"], at_end, "resumed on 1 process")


def test_a_syncnorm_checkpoint_loads_into_the_unconverted_model_and_back() -> None:
    """A rank's checkpoint serves plain torch BatchNorm code (export, single-GPU inference) and back."""
    model = syncnorm.convert_model(_model())
    model(torch.randn(6, 2, 4, 4))  # non-trivial running statistics (no process group: plain BatchNorm)
    plain = _model()
    plain.load_state_dict(torch.load(io.BytesIO(_save(model, _optimizer(model))), weights_only=True)["model"])
    again = syncnorm.convert_model(_model())
    again.load_state_dict(plain.state_dict(), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value) and torch.equal(again.state_dict()[key], value), key
