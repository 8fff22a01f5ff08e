"""The forward's CUDA-graph-capture branch, forced on CPU: no host read, exact for uneven and empty ranks.

A rank holding at most one value per channel reads the global count on the host in eager mode (to raise
torch's error for a global count of 1, or to leave the running statistics alone for an all-empty global
batch). While a CUDA graph is captured that read is forbidden, so the forward guards both on the device
instead (``syncnorm/_function.py``: ``capturing``). Without a GPU, the tests make ``capturing`` answer True
inside the ranks, count host syncs with the op-count mode, and compare every step with float64 torch
BatchNorm run from the same initial state on the concatenated batches. tests/test_cuda_graphs.py captures
the empty-rank case for real on a GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed import my_slice, run_on_ranks, use_kernels
from reference import assert_close, reference_module, reference_step
from test_op_counts import CountOps

import syncnorm
from syncnorm import _function

BACKENDS = pytest.mark.parametrize("kernels", ["native", "fused"])


def _batches(sizes_per_step: list[list[int]]) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(11)
    out = []
    for sizes in sizes_per_step:
        x = torch.randn(sum(sizes), 3, generator=generator) * 2 + 1  # (N, C): one sample is one value
        out.append({"x": x, "dy": torch.randn(x.shape, generator=generator), "sizes": sizes})
    return out


def rank_forced_capture(batches: list[dict[str, Any]], kernels: str) -> list[dict[str, Any]]:
    original = _function.capturing
    _function.capturing = lambda device: True  # what a CUDA graph capture would answer
    try:
        with use_kernels(kernels):
            bn = syncnorm.SyncBatchNorm(3)
            reports = []
            for batch in batches:
                x = my_slice(batch["x"], batch["sizes"]).requires_grad_()
                with CountOps() as counted:
                    y = bn(x)
                    (y * my_slice(batch["dy"], batch["sizes"])).sum().backward()
                reports.append({"y": y.detach(), "grad_x": x.grad, "syncs": counted.syncs,
                                "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
                                "num_batches_tracked": int(bn.num_batches_tracked),
                                "ops": counted.ops})
            return reports
    finally:
        _function.capturing = original


@BACKENDS
def test_capture_branch_has_no_host_sync_and_is_exact_for_uneven_and_empty_ranks(kernels: str) -> None:
    # Step 0: a fresh layer (two-pass merge), an empty rank and a rank of one sample; step 1: all ranks
    # empty (the running statistics must stay); step 2: the steady state with the same uneven ranks.
    batches = _batches([[0, 1, 4], [0, 0, 0], [2, 0, 1]])
    reports = run_on_ranks(3, rank_forced_capture, batches, kernels)
    reference = reference_module(2, 3, {}, None, None)
    for step, batch in enumerate(batches):
        expected = reference_step(reference, batch["x"], batch["dy"])
        if batch["x"].numel():
            assert_close(torch.cat([r[step]["y"] for r in reports]), expected["y"], torch.float32, f"{step} y")
            assert_close(torch.cat([r[step]["grad_x"] for r in reports]), expected["grad_x"], torch.float32,
                         f"{step} grad_x")
        for rank, r in enumerate(reports):
            assert r[step]["syncs"] == [], (step, r[step]["syncs"])
            # A rank of at most one value takes the device-side check; the others need no check at all.
            checked_on_device = any(op.startswith("_assert_async") for op in r[step]["ops"])
            assert checked_on_device == (batch["sizes"][rank] <= 1), (step, rank, r[step]["ops"])
            assert_close(r[step]["running_mean"], expected["running_mean"], torch.float32, f"{step} running_mean")
            assert_close(r[step]["running_var"], expected["running_var"], torch.float32, f"{step} running_var")
            assert r[step]["num_batches_tracked"] == int(expected["num_batches_tracked"])


def rank_forced_capture_count_of_one(kernels: str) -> dict[str, Any]:
    original = _function.capturing
    _function.capturing = lambda device: True
    try:
        with use_kernels(kernels):
            bn = syncnorm.SyncBatchNorm(3)
            before = {k: v.clone() for k, v in bn.state_dict().items()}
            x = torch.randn(1 if torch.distributed.get_rank() == 1 else 0, 3)
            try:
                with CountOps() as counted:
                    bn(x)
            except RuntimeError as error:  # on a GPU: a device-side assertion
                unchanged = all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
                return {"error": str(error), "unchanged": unchanged, "syncs": counted.syncs}
            return {"error": None}
    finally:
        _function.capturing = original


@BACKENDS
def test_capture_branch_asserts_on_the_device_for_a_global_count_of_one(kernels: str) -> None:
    for report in run_on_ranks(3, rank_forced_capture_count_of_one, kernels):
        assert report["error"] and "Expected more than 1 value per channel when training" in report["error"]
        assert report["unchanged"] and report["syncs"] == []
