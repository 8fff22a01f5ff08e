"""Test-only hook (on PYTHONPATH in tests/test_selftest.py): a corrupted all-reduce, to see the self-test fail.

With ``SYNCNORM_TEST_PERTURB_ALL_REDUCE=EPS`` set, every ``torch.distributed.all_reduce`` of a floating-point
tensor perturbs each element of its result by EPS relative (e.g. 0.001: 0.1 %), alternately up and down,
as a flaky network card or a broken collective library would. (A uniform scale of every element would be
a weak test: the mean and variance are ratios of all-reduced sums, and a common factor cancels in them.)
Without the variable this file does nothing.
"""

from __future__ import annotations

import os

_EPS = os.environ.get("SYNCNORM_TEST_PERTURB_ALL_REDUCE")
if _EPS:
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    _original = c10d.all_reduce
    _eps = float(_EPS)

    def _perturbed_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):  # type: ignore[no-untyped-def]
        work = _original(tensor, op=op, group=group, async_op=async_op)
        if work is not None:
            work.wait()
        if tensor.is_floating_point() and tensor.numel() > 0:
            sign = torch.ones(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
            sign[1::2] = -1
            tensor.mul_(1 + _eps * sign.view(tensor.shape))
        return work

    dist.all_reduce = _perturbed_all_reduce
    c10d.all_reduce = _perturbed_all_reduce
