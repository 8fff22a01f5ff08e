"""Real architectures with random weights (nothing is downloaded): convert, one DDP step on two Gloo ranks, revert.

For each model, one rank-pool call: every rank builds the same model (same seed), converts it,
wraps it in DistributedDataParallel and takes one SGD step on its half of a global batch; then it
compares loss, output, gradients, updated parameters and running statistics with the oracle, the
ORIGINAL (unconverted) model in float64 taking the same step on the whole batch in that same
process, without any torch.distributed call. The comparison happens inside the ranks so that no
model-sized tensors travel between processes; any mismatch fails the test with every rank's
traceback. DDP averages gradients over the two ranks and each rank's loss is the mean over its
half, so the averaged gradient is that of the mean loss over the whole batch: the oracle's.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from distributed import COLLECTIVES, my_slice, rank, run_on_ranks
from reference import TOLERANCES
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncnorm

NUM_CLASSES = 10
PER_RANK = 2  # samples on each rank; the global batch is 4


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(num_classes=NUM_CLASSES, **kwargs)


# name -> (builder, one input sample's shape). Dropout and stochastic depth are off, so that the
# ranks and the oracle compute the same function; inputs are the smallest each net takes well.
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (_torchvision("resnet18"), (3, 64, 64)),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small", dropout=0.0), (3, 64, 64)),
    "efficientnet_b0": (_torchvision("efficientnet_b0", dropout=0.0, stochastic_depth_prob=0.0), (3, 64, 64)),
    "r3d_18": (lambda: torchvision.models.video.r3d_18(num_classes=NUM_CLASSES), (3, 2, 16, 16)),
    "timm_mobilenetv3_small_050": (
        lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=NUM_CLASSES), (3, 64, 64)
    ),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same random weights in every process
    return MODELS[name][0]()


def global_batch(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2 * PER_RANK, *MODELS[name][1], generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (2 * PER_RANK,), generator=generator)
    return x.to(dtype), labels


def sgd_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    loss = F.cross_entropy(out, labels)
    loss.backward()
    optimizer.step()
    return out.detach(), loss.detach()


def snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors themselves, not copies: nothing changes them after the step (revert keeps them as they are)."""
    return {"grad": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "param": {n: p.detach() for n, p in model.named_parameters()},
            "buffer": dict(model.named_buffers())}


def shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same storage, same values (state_dict hands out fresh detached views of the same tensors)."""
    return a.data_ptr() == b.data_ptr() and torch.equal(a, b)


def compare(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """Assert closeness at ``dtype``'s tolerance; return the largest error relative to the tolerance."""
    tol = TOLERANCES[dtype]
    got, expected = got.double(), expected.double()
    if got.shape == expected.shape and got.numel():
        # torch.testing's check, vectorised, for tens of millions of values; it reports any failure below.
        ratio = (got - expected).abs_().div_(expected.abs().mul_(tol["rtol"]).add_(tol["atol"])).max()
        if ratio <= 1:
            return float(ratio)
    torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{what}: {m}")
    return 0.0


def rank_model_step(name: str, dtype: torch.dtype) -> dict[str, Any]:
    model = build(name).to(dtype)
    classes = [type(m) for m in model.modules()]
    state = model.state_dict()
    oracle = copy.deepcopy(model).double()
    x, labels = global_batch(name, dtype)

    syncnorm.convert_model(model)
    assert list(model.state_dict()) == list(state)
    assert all(shares(v, state[k]) for k, v in model.state_dict().items()), "conversion copied a tensor"
    converted = [type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)]
    assert converted and all(c == "SyncBatchNorm" or c.startswith("Sync") for c in converted)

    ddp = nn.parallel.DistributedDataParallel(model)
    COLLECTIVES.reset()
    out, loss = sgd_step(ddp, my_slice(x, [PER_RANK, PER_RANK]), my_slice(labels, [PER_RANK, PER_RANK]))
    synced_layers = COLLECTIVES.names().count("all_reduce")
    got = snapshot(model)

    ref_out, ref_loss = sgd_step(oracle, x.double(), labels)
    expected = snapshot(oracle)
    worst = compare(out, ref_out.split([PER_RANK, PER_RANK])[rank()], dtype, "output")
    for kind in ("grad", "param", "buffer"):
        assert sorted(got[kind]) == sorted(expected[kind]), kind
        for key, value in expected[kind].items():
            worst = max(worst, compare(got[kind][key], value, dtype, f"{kind} {key}"))

    syncnorm.revert_model(model)
    assert [type(m) for m in model.modules()] == classes
    assert all(shares(v, state[k]) for k, v in model.state_dict().items()), "revert copied a tensor"
    return {"loss": float(loss), "ref_loss": float(ref_loss), "worst": worst, "layers": len(converted),
            "all_reduces": synced_layers}


# The ranks run in float64, compared at float64's tolerance. Not float32: the ORIGINAL resnet18 in
# float32 in one process already differs from itself in float64 by 0.04 in conv1.weight's gradient
# (rounding flips ReLU/max-pool decisions on random weights), so no synchronised BatchNorm could meet
# float32's 1e-5 there. float32 (and fp16/bf16) is checked layer by layer in test_equivalence.py.
@pytest.mark.parametrize("name", MODELS.keys())
def test_converted_model_takes_the_single_process_step_on_two_ranks(name: str) -> None:
    dtype = torch.float64
    reports = run_on_ranks(2, rank_model_step, name, dtype)
    mean_loss = sum(r["loss"] for r in reports) / 2
    torch.testing.assert_close(mean_loss, reports[0]["ref_loss"], **TOLERANCES[dtype])
    for r in reports:
        assert r["layers"] >= 20
        # Per BatchNorm layer: one all-reduce forward (two for float64 input) and one backward; DDP's
        # gradient buckets are reduced from C++ and not counted.
        assert r["all_reduces"] == (3 if dtype == torch.float64 else 2) * r["layers"]


def test_reverted_resnet18_traces_and_exports() -> None:
    model = syncnorm.convert_model(build("resnet18"))
    model = syncnorm.revert_model(model).eval()
    assert not any(isinstance(m, syncnorm.SyncBatchNorm) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    torch.testing.assert_close(torch.jit.trace(model, (x,))(x), expected)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)
