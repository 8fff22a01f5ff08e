"""torch.compile: a model with syncnorm layers compiles (graph breaks allowed) and trains exactly as eager.

Two models: one whose BatchNorm2d layers become syncnorm.SyncBatchNorm, and one with a BatchNorm
subclass overriding forward, which convert_model turns into a generated subclass (its F.batch_norm
call routed to syncnorm by a TorchFunctionMode): dynamo must keep that routing.

Compiled with ``backend="aot_eager"`` (dynamo capture + AOTAutograd, no code generation) so the test
stays a few seconds on 2 CPU cores; inductor also runs (benchmarks/bench_model.py --compile) but
spends about a minute in its C++ compiler here, too long for the suite.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncnorm
from tests.distributed import my_slice, run_on_ranks
from tests.reference import TOLERANCES

SIZES = [3, 5]


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (like timm's BatchNormAct2d): convert_model gives it a
    generated subclass whose F.batch_norm call is routed to syncnorm by a TorchFunctionMode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x)) * 1.5


def _model(first_norm: str = "BatchNorm2d") -> nn.Module:
    torch.manual_seed(0)
    norm = BatchNormAct(6) if first_norm == "subclass" else nn.Sequential(nn.BatchNorm2d(6), nn.ReLU())
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4))


def rank_compiled_and_eager_steps(x: torch.Tensor, dy: torch.Tensor, first_norm: str) -> dict[str, Any]:
    """On one rank: two training steps of the same syncnorm model, compiled and eager."""
    compiled_model = syncnorm.convert_model(_model(first_norm))
    expected_class = "SyncBatchNormAct" if first_norm == "subclass" else "SyncBatchNorm"
    assert expected_class in {type(m).__name__ for m in compiled_model.modules()}
    eager_model = copy.deepcopy(compiled_model)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    reports: dict[str, Any] = {}
    for name, model, module in (("compiled", compiled, compiled_model), ("eager", eager_model, eager_model)):
        steps = []
        for step in range(2):
            inp = my_slice(x[step], SIZES).requires_grad_()
            module.zero_grad(set_to_none=True)
            y = model(inp)
            (y * my_slice(dy[step], SIZES)).sum().backward()
            steps.append({"y": y.detach(), "grad_x": inp.grad,
                          "grads": [p.grad.clone() for p in module.parameters()]})
        reports[name] = {"steps": steps, "buffers": [b.clone() for b in module.buffers()]}
    torch._dynamo.reset()
    return reports


def _reference(x: torch.Tensor, dy: torch.Tensor, first_norm: str) -> list[dict[str, Any]]:
    """The same two steps in float64, one process, plain BatchNorm, on the whole batch."""
    model = _model(first_norm).double()
    out = []
    for step in range(2):
        inp = x[step].double().requires_grad_()
        model.zero_grad(set_to_none=True)
        y = model(inp)
        (y * dy[step].double()).sum().backward()
        out.append({"y": y.detach(), "grad_x": inp.grad, "grads": [p.grad.clone() for p in model.parameters()]})
    out.append({"buffers": [b.clone() for b in model.buffers()]})
    return out


@pytest.mark.parametrize("first_norm", ["BatchNorm2d", "subclass"])
def test_compiled_model_trains_like_eager_and_like_one_process_on_two_ranks(first_norm: str) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, sum(SIZES), 3, 6, 6, generator=generator) * 2 + 1
    dy = torch.randn(2, sum(SIZES), 4, 4, 4, generator=generator)
    reports = run_on_ranks(2, rank_compiled_and_eager_steps, x, dy, first_norm)
    reference = _reference(x, dy, first_norm)
    tol = TOLERANCES[torch.float32]
    for step in range(2):
        for key in ("y", "grad_x"):
            compiled = torch.cat([r["compiled"]["steps"][step][key] for r in reports])
            eager = torch.cat([r["eager"]["steps"][step][key] for r in reports])
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
            torch.testing.assert_close(compiled.double(), reference[step][key], **tol)
        # Each rank holds its share of the parameter gradients; their sum is the whole batch's.
        summed = [sum(g) for g in zip(*(r["compiled"]["steps"][step]["grads"] for r in reports))]
        for ours, expected in zip(summed, reference[step]["grads"]):
            torch.testing.assert_close(ours.double(), expected, **tol)
    for rank_report in reports:
        for ours, eager, expected in zip(rank_report["compiled"]["buffers"], rank_report["eager"]["buffers"],
                                         reference[2]["buffers"]):
            torch.testing.assert_close(ours, eager, rtol=0, atol=0)
            torch.testing.assert_close(ours.double(), expected.double(), **tol)
