"""The oracle: torch's own BatchNorm, in float64, in one process, on the concatenation of every rank's batch."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

# Tolerances of the input dtype (outputs and gradients are O(1) in these tests). Never widened to pass.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float16: dict(rtol=1e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
}


def batchnorm_class(dim: int) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim]


def reference_module(dim: int, channels: int, layer_kwargs: dict[str, Any],
                     weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> nn.Module:
    """A float64 ``torch.nn.BatchNorm{1,2,3}d`` with the given parameters."""
    bn = batchnorm_class(dim)(channels, dtype=torch.float64, **layer_kwargs)
    with torch.no_grad():
        if weight is not None and bn.weight is not None:
            bn.weight.copy_(weight)
        if bias is not None and bn.bias is not None:
            bn.bias.copy_(bias)
    return bn


def reference_step(bn: nn.Module, x: torch.Tensor, dy: Optional[torch.Tensor],
                   dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """One forward (and backward with upstream gradient ``dy``) on the whole batch, in ``dtype``."""
    x64 = x.detach().to(dtype).requires_grad_(dy is not None)
    for p in bn.parameters():
        p.grad = None
    y = bn(x64)
    out: dict[str, Any] = {"y": y.detach()}
    if dy is not None:
        (y * dy.to(dtype)).sum().backward()
        out["grad_x"] = x64.grad
        out["grad_weight"] = None if bn.weight is None else bn.weight.grad
        out["grad_bias"] = None if bn.bias is None else bn.bias.grad
    out["running_mean"] = None if bn.running_mean is None else bn.running_mean.clone()
    out["running_var"] = None if bn.running_var is None else bn.running_var.clone()
    out["num_batches_tracked"] = None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone()
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``actual`` (any dtype) equals the float64 ``expected`` to the tolerance of ``dtype``."""
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype],
                               msg=lambda m: f"{what}: {m}")


def check_model_against_reference(reports: list[dict[str, Any]], model: nn.Module, x: torch.Tensor,
                                  dy: torch.Tensor) -> None:
    """Per-rank model reports (``y``, ``grad_x``, ``grads``, ``buffers``) against ``model`` run in float64 on the
    whole batch ``x`` with upstream gradient ``dy``: outputs and input gradients concatenate, parameter gradients
    sum over ranks, buffers equal on every rank."""
    reference = model.double()
    x64 = x.double().requires_grad_()
    y = reference(x64)
    (y * dy.double()).sum().backward()
    assert_close(torch.cat([r["y"] for r in reports]), y.detach(), torch.float32, "output")
    assert_close(torch.cat([r["grad_x"] for r in reports]), x64.grad, torch.float32, "grad_x")
    for name, p in reference.named_parameters():
        assert_close(sum(r["grads"][name].double() for r in reports), p.grad, torch.float32, name)
    for name, b in reference.named_buffers():
        for r in reports:
            assert_close(r["buffers"][name], b, torch.float32, name)
