"""Per-layer op counts of one training step on W=2 Gloo ranks, asserted as budgets.

On a GPU every dispatched op is a kernel launch plus host time, so the count is a CPU-measurable
proxy for per-layer overhead. Counted with a TorchDispatchMode around the forward and around the
backward of one layer (views, metadata ops and ``empty*`` not counted), and host syncs
(``_local_scalar_dense`` i.e. ``.item()``/``.tolist()``, ``nonzero``, boolean indexing) separately.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from distributed import run_on_ranks, use_kernels
from torch.utils._python_dispatch import TorchDispatchMode

import syncnorm

_NOT_COUNTED = ("empty", "new_empty", "detach", "alias", "lift_fresh")
_HOST_SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "index.Tensor")


class CountOps(TorchDispatchMode):
    """Records the name of every counted op and of every host sync dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        qualified = str(func.name())
        name = qualified.split("::")[-1]
        if qualified.startswith("syncnorm::"):
            # syncnorm's custom ops (syncnorm/_triton.py) allocate their outputs and launch ONE Triton
            # kernel: one op. (Under TRITON_INTERPRET=1 the interpreter emulates that kernel with tensor
            # ops of its own, run here below this mode, so they are not counted as the GPU does not run them.)
            self.ops.append(name)
            return func(*args, **(kwargs or {}))
        if any(name.startswith(s) for s in _HOST_SYNCS) or name.endswith("_local_scalar_dense"):
            if name != "index.Tensor" or any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                             for a in (args[1] if len(args) > 1 else [])
                                             if a is not None):
                self.syncs.append(name)
        if not (getattr(func, "is_view", False) or any(name.startswith(s) for s in _NOT_COUNTED)):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


LAYOUTS = {
    "NC": (lambda: torch.randn(16, 32), torch.float32),
    "NCHW": (lambda: torch.randn(4, 32, 5, 5), torch.float32),
    "channels_last": (lambda: torch.randn(4, 32, 5, 5).contiguous(memory_format=torch.channels_last),
                      torch.float32),
    "bfloat16": (lambda: torch.randn(4, 32, 5, 5), torch.bfloat16),
}


def rank_count_ops(layout: str, kernels: str) -> dict[str, Any]:
    make, dtype = LAYOUTS[layout]
    torch.manual_seed(0)
    bn = syncnorm.SyncBatchNorm(32)
    x = make().to(dtype).requires_grad_()
    with use_kernels(kernels), counting_triton_launches():
        bn(x)  # a first step, so that one-time work (kernel lookups, Triton compilation) is not counted
        bn.zero_grad(set_to_none=True)
        with CountOps() as forward:
            y = bn(x)
        dy = torch.randn_like(y)
        with CountOps() as backward:
            y.backward(dy)
    return {"forward": forward.ops, "backward": backward.ops, "syncs": forward.syncs + backward.syncs}


@contextlib.contextmanager
def counting_triton_launches() -> Iterator[None]:
    """Each launch of a syncnorm Triton kernel counts as ONE op (one kernel on a GPU): eager steps launch them
    directly. Under TRITON_INTERPRET=1 the interpreter emulates the kernel with tensor ops of its own, run
    below the counting mode here, as a GPU does not run them."""
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

    from syncnorm import _triton

    launch = _triton._launch

    def counted(kernel_index: int, *args: Any, **kwargs: Any) -> None:
        mode = _get_current_dispatch_mode()
        if isinstance(mode, CountOps):
            mode.ops.append(("pack" if kernel_index == 0 else "finish") + "_kernel")
        with _disable_current_modes():
            launch(kernel_index, *args, **kwargs)

    _triton._launch = counted  # type: ignore[assignment]
    try:
        yield
    finally:
        _triton._launch = launch


# Exact (forward, backward) ops of a float32 step; the forward includes the module's num_batches_tracked
# increment. "fused" and "native-triton" are what a GPU runs (the per-channel prologue and epilogue as one
# Triton kernel each, launched directly in eager mode and counted as one op each, here in Triton's
# interpreter). "native" is what a CPU runs: the same per-channel math in aten ops, ~35 small ops that only a
# fused kernel makes one (no Triton for CPU tensors outside its interpreter); "fused-aten" is a GPU without
# Triton. The native kernels take bfloat16 input upcast: one more op each way (UPCAST_OPS).
BUDGETS = {"fused": (7, 6), "native-triton": (9, 9), "native": (42, 9), "fused-aten": (53, 6)}
UPCAST_OPS = {"native-triton": 1, "native": 1}


@pytest.mark.parametrize("kernels", list(BUDGETS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_step_op_budget_and_no_host_sync(layout: str, kernels: str) -> None:
    extra = UPCAST_OPS.get(kernels, 0) if layout == "bfloat16" else 0
    forward_budget, backward_budget = (ops + extra for ops in BUDGETS[kernels])
    for report in run_on_ranks(2, rank_count_ops, layout, kernels):
        assert report["syncs"] == [], report["syncs"]
        assert len(report["forward"]) == forward_budget, (len(report["forward"]), report["forward"])
        assert len(report["backward"]) == backward_budget, (len(report["backward"]), report["backward"])
