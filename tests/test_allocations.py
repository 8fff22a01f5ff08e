"""Activation-sized allocations of the CPU path: as many as local BatchNorm, no more.

A fresh activation-sized tensor costs more than its arithmetic on CPU (new pages are faulted in:
docs/performance.md), so the forward creates exactly one (its output, which first holds the
deviations of the local moments) and the backward exactly one (the input gradient). Counted with a
dispatch mode that records every aten output whose storage is not one of the op's inputs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from syncnorm import _comm
from syncnorm._function import SyncBatchNormFunction


class NewLargeTensors(TorchDispatchMode):
    """Names the aten ops that return a new tensor of at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.ops.append(str(func))
        return out


LAYOUTS = {
    "NCHW": lambda: torch.randn(8, 16, 10, 10),
    "channels_last": lambda: torch.randn(8, 16, 10, 10).contiguous(memory_format=torch.channels_last),
    "(N,C)": lambda: torch.randn(64, 16),
    "NCDHW": lambda: torch.randn(4, 16, 3, 5, 5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_activation_sized_tensor_per_pass(layout: str, dtype: torch.dtype, monkeypatch: Any) -> None:
    # One rank: the collectives are no-ops here; what is counted is the per-element work around them.
    monkeypatch.setattr(_comm, "all_reduce_sum", lambda *args, **kwargs: None)
    x = (LAYOUTS[layout]().to(dtype) * 3 + 5).requires_grad_()
    channels = x.shape[1]
    weight = torch.rand(channels, dtype=dtype, requires_grad=True)
    bias = torch.rand(channels, dtype=dtype, requires_grad=True)
    running_mean, running_var = torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)

    with NewLargeTensors(x.numel()) as forward:
        y = SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, 1e-5, 0.1, None, "bn")
    grad_output = torch.randn_like(y)
    with NewLargeTensors(x.numel()) as backward:
        y.backward(grad_output)

    assert len(forward.ops) == 1, f"forward allocated {forward.ops}"
    assert len(backward.ops) == 1, f"backward allocated {backward.ops}"
    # The counting itself is checked on local BatchNorm: one tensor in each direction too.
    local = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[x.dim()](channels).to(dtype)
    with NewLargeTensors(x.numel()) as local_ops:
        local(x).backward(grad_output)
    assert len(local_ops.ops) == 2, local_ops.ops
