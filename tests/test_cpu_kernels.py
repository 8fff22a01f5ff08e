"""The per-channel work of an eager CPU step in numpy (syncnorm/_cpu.py) against the aten ops it replaces.

Each is compared with ``_stats``' aten ops on the same buffers (the aten ops stay what a GPU without
Triton and torch.compile run), and with the float64 statistics of the data themselves; the multi-rank
suites run the numpy path as ``native`` and the aten ops as ``native-aten`` / ``fused-aten``.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from syncnorm import _cpu, _stats

CHANNELS = 5


def _batches(mean: float, std: float, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [(mean + std * torch.randn(n, CHANNELS, 3, generator=generator, dtype=torch.float64)).to(dtype)
            for n in (4, 7)]


def _both(summed: torch.Tensor, shifts: Optional[torch.Tensor], about: Optional[torch.Tensor],
          weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], dtype: torch.dtype,
          guard_empty: bool = False) -> tuple[dict, dict]:
    """(numpy, aten): the per-channel values, running statistics and next candidates from the same buffers."""
    results = []
    for use_numpy in (True, False):
        running_mean, running_var = torch.full((CHANNELS,), 2.0, dtype=dtype), torch.full((CHANNELS,), 3.0, dtype=dtype)
        shifts_copy = None if shifts is None else shifts.clone()
        following = torch.full((2, CHANNELS), 7.0, dtype=torch.float64)
        if use_numpy:
            stats = _cpu.finish_statistics(summed, shifts_copy, about, weight, bias, 1e-5, dtype, running_mean,
                                           running_var, 0.1, following, guard_empty, int_count=True)
        else:
            stats = _stats.finish_statistics(summed, shifts_copy, about, weight, bias, 1e-5, dtype, coefficients=True,
                                             int_count=True, next_shifts=following)
            _stats.update_running_statistics(running_mean, running_var, stats, 0.1, guard_empty=guard_empty)
        values = {key: getattr(stats, key) for key in ("mean", "invstd", "residual", "r_invstd2", "alpha", "beta",
                                                        "coef", "int_count")}
        values.update(running_mean=running_mean, running_var=running_var, next_shifts=following)
        results.append(values)
    return results[0], results[1]


def _compare(by_numpy: dict, by_aten: dict, dtype: torch.dtype) -> None:
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-6}
    for key, value in by_numpy.items():
        torch.testing.assert_close(value, by_aten[key], equal_nan=True, **tolerance,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rows", [0, 1, 2], ids=["about-zero", "one-candidate", "two-candidates"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("about_local", [False, True], ids=["about-mean", "about-local-shift"])
def test_numpy_pack_and_finish_equal_the_aten_ops_and_the_float64_statistics(
        dtype: torch.dtype, rows: int, affine: bool, about_local: bool) -> None:
    # About zero a large mean cancels (1e-16 (mean / std)^2 of the variance, differently rounded by each
    # implementation): that case runs on data of mean 1; the others at mean 1e4, std 1e-2.
    batches = _batches(1e4, 1e-2, dtype) if rows else _batches(1.0, 1.0, dtype)
    x = torch.cat(batches).double()
    ref_mean, ref_var = x.mean((0, 2)), x.var((0, 2), correction=0)
    near = ref_mean + 1e-3
    # Two candidates: the near one in row 0 for channels 0-2 and in row 1 for 3-4, the other one zero.
    shifts = {0: None, 1: near.view(1, CHANNELS),
              2: torch.stack([torch.where(torch.arange(CHANNELS) < 3, near, 0.0),
                              torch.where(torch.arange(CHANNELS) < 3, 0.0, near)])}[rows]
    packed_numpy = [_cpu.pack_moments(_stats.local_moments(b), shifts) for b in batches]
    packed_aten = [_stats.pack_moments(_stats.local_moments(b), shifts) for b in batches]
    for ours, theirs in zip(packed_numpy, packed_aten):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-9)
    summed = packed_numpy[0] + packed_numpy[1]
    weight = torch.linspace(0.5, 1.5, CHANNELS, dtype=dtype) if affine else None
    bias = torch.linspace(-1, 1, CHANNELS, dtype=dtype) if affine else None
    about = _stats.local_moments(batches[0]).shift if about_local else None
    by_numpy, by_aten = _both(summed, shifts, about, weight, bias, dtype)
    _compare(by_numpy, by_aten, dtype)
    if rows:  # about a near shift the merge is exact: against the data's own statistics
        invstd = (ref_var + 1e-5).rsqrt()
        torch.testing.assert_close(by_numpy["invstd"].double(), invstd, rtol=1e-5, atol=0)
        torch.testing.assert_close(by_numpy["next_shifts"][0], ref_mean, rtol=1e-12, atol=0)
        assert torch.equal(by_numpy["next_shifts"][1], near)


def test_numpy_finish_keeps_nan_and_the_first_candidate_where_the_mean_is_not_finite() -> None:
    x = torch.randn(6, CHANNELS)
    x[0, 2], x[1, 4] = float("nan"), float("inf")
    shifts = torch.arange(2 * CHANNELS, dtype=torch.float64).view(2, CHANNELS)
    summed = _stats.pack_moments(_stats.local_moments(x), shifts)
    by_numpy, by_aten = _both(summed, shifts, None, None, None, torch.float32)
    _compare(by_numpy, by_aten, torch.float32)
    assert torch.isnan(by_numpy["invstd"][2]) and torch.isnan(by_numpy["running_var"][2])
    assert torch.isfinite(by_numpy["next_shifts"]).all()
    assert by_numpy["next_shifts"][0, 2] == shifts[0, 2] and by_numpy["next_shifts"][0, 4] == shifts[0, 4]


def test_numpy_finish_of_an_empty_global_batch_under_the_device_guard_keeps_the_buffers() -> None:
    summed = _stats.pack_moments(_stats.empty_moments(torch.empty(0, CHANNELS)), torch.zeros(2, CHANNELS,
                                                                                            dtype=torch.float64))
    by_numpy, by_aten = _both(summed, torch.zeros(2, CHANNELS, dtype=torch.float64), None, None, None, torch.float32,
                              guard_empty=True)
    _compare(by_numpy, by_aten, torch.float32)
    assert torch.equal(by_numpy["running_mean"], torch.full((CHANNELS,), 2.0))
    assert torch.equal(by_numpy["running_var"], torch.full((CHANNELS,), 3.0))


def test_numpy_backward_sums_equal_the_aten_ops() -> None:
    generator = torch.Generator().manual_seed(5)
    sum_dy, sum_dy_xmu, residual, r_invstd2 = torch.randn(4, CHANNELS, generator=generator)
    ours = _cpu.backward_sums(sum_dy, sum_dy_xmu, residual, r_invstd2)
    second = sum_dy_xmu - residual * sum_dy
    torch.testing.assert_close(ours, torch.stack([sum_dy - r_invstd2 * second, second]), rtol=1e-6, atol=1e-6)


def test_numpy_path_takes_only_cpu_tensors_numpy_can_view() -> None:
    assert _cpu.usable(torch.zeros(2), torch.zeros(2, dtype=torch.float64), None)
    assert not _cpu.usable(torch.zeros(2, dtype=torch.bfloat16))
    assert not _cpu.usable(torch.zeros(2, device="meta"))


def test_numpy_path_leaves_parameter_and_buffer_storages_resizable() -> None:
    """``.numpy()`` on a tensor's memory makes its storage non-resizable for good; FSDP2 resizes parameter storages
    (tests/test_distributed_modern.py caught it): the numpy path views only its own temporaries."""
    x = torch.randn(6, CHANNELS)
    local = _stats.local_moments(x)
    shifts = torch.zeros(2, CHANNELS, dtype=torch.float64)
    summed = _cpu.pack_moments(local, shifts)
    weight, bias = torch.nn.Parameter(torch.ones(CHANNELS)), torch.nn.Parameter(torch.zeros(CHANNELS))
    running_mean, running_var = torch.zeros(CHANNELS), torch.ones(CHANNELS)
    _cpu.finish_statistics(summed, shifts, local.shift, weight, bias, 1e-5, torch.float32, running_mean, running_var,
                           0.1, shifts, False)
    for tensor in (weight, bias, running_mean, running_var):
        assert tensor.untyped_storage().resizable()
