"""The per-channel Triton kernels (syncnorm/_triton.py), run in Triton's interpreter on CPU tensors.

Each is compared with an independent float64 computation from the data itself, and with the aten
ops that replace them where Triton does not run (``_stats``). The multi-rank suites run them under
``use_kernels("fused")`` / ``"native-triton"``.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from syncnorm import _stats, _triton

pytestmark = pytest.mark.skipif(not _triton._triton_installed(), reason="needs Triton (torch's CUDA builds ship it)")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rank_batches(mean: float, std: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [(mean + std * torch.randn(n, 5, 3, generator=generator, dtype=torch.float64)).float() for n in (4, 7)]


def _reference(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float64 mean, biased variance and count of the concatenated batch, per channel."""
    x = torch.cat(batches).double()
    return x.mean((0, 2)), x.var((0, 2), correction=0), x.numel() // x.shape[1]


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1e4, 1e-2)], ids=["standard", "large-mean"])
@pytest.mark.parametrize("shifts_kind", ["none", "one", "two"], ids=["no-shift", "one-shift", "two-shifts"])
def test_pack_kernel_equals_aten_and_merges_to_the_float64_moments(mean: float, std: float, shifts_kind: str) -> None:
    batches = _rank_batches(mean, std)
    ref_mean, ref_var, count = _reference(batches)
    near = ref_mean + 0.5 * std  # a common shift near (not at) the mean
    shifts = {"none": None, "one": near, "two": torch.stack([torch.zeros_like(near), near])}[shifts_kind]
    rows = 2 if shifts_kind == "two" else 1
    packed_triton = torch.zeros(1 + 2 * rows * 5, dtype=torch.float64)
    for x in batches:
        local = _stats.local_moments(x)
        triton_packed = _triton.pack_moments(local, shifts)
        aten_packed = _stats.pack_moments(local, shifts)
        torch.testing.assert_close(triton_packed, aten_packed, rtol=1e-12, atol=1e-12 * count * max(mean, std, 1.0))
        packed_triton += triton_packed
    # The sums about the shift near the mean (the last row) merge to the float64 moments.
    last = torch.cat([packed_triton[:1], packed_triton[1 + (rows - 1) * 5: 1 + rows * 5], packed_triton[-5:]])
    merged = _stats.unpack_moments(last, None if shifts is None else near)
    assert merged.num_values.item() == count
    torch.testing.assert_close(merged.mean, ref_mean, rtol=0, atol=1e-6 * std)  # float32 local sums
    # About zero (no shift) a float64 merge keeps ~1e-16 (mean / std)^2 of the variance (_stats docstring).
    far = (mean / std) ** 2 if shifts is None else 0.0
    torch.testing.assert_close(merged.var, ref_var, rtol=1e-5 + 4e-16 * far, atol=0)


def _finish_both(summed: torch.Tensor, shifts: Optional[torch.Tensor], about: Optional[torch.Tensor],
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 in_place: bool = False) -> tuple[dict, dict]:
    """The Triton kernel's and the aten ops' values; ``in_place``: the next candidates overwrite ``shifts``."""
    results = []
    for use_triton in (True, False):
        running_mean, running_var = torch.full((5,), 2.0), torch.full((5,), 3.0)
        shifts_copy = None if shifts is None else shifts.clone()
        next_shifts = shifts_copy if in_place else torch.full((2, 5), 7.0, dtype=torch.float64)
        if use_triton:
            stats = _triton.finish_statistics(summed, shifts_copy, about, weight, bias, 1e-5, torch.float32,
                                              running_mean, running_var, 0.1, next_shifts, 5)
        else:
            stats = _stats.finish_statistics(summed, shifts_copy, about, weight, bias, 1e-5, torch.float32,
                                             coefficients=True, int_count=True, next_shifts=next_shifts)
            _stats.update_running_statistics(running_mean, running_var, stats, 0.1)
        values = {key: getattr(stats, key) for key in ("mean", "invstd", "residual", "r_invstd2", "alpha", "beta",
                                                        "coef", "int_count")}
        values.update(running_mean=running_mean, running_var=running_var, next_shifts=next_shifts)
        results.append(values)
    return results[0], results[1]


def _candidates(ref_mean: torch.Tensor, kind: str) -> torch.Tensor:
    """Candidate shifts: one near the mean; or two, the near one in row 0 for channels 0-2 and in row 1 for 3-4,
    the other one zero (1e4 / 1e-2 = 1e6 standard deviations away: its sums would lose ~1e-4 of the variance)."""
    near = (ref_mean + 1e-3).view(1, 5)
    if kind == "one":
        return near
    rows = torch.zeros(2, 5, dtype=torch.float64)
    rows[0, :3], rows[1, 3:] = near[0, :3], near[0, 3:]
    return rows


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("about_local", [False, True], ids=["about-mean", "about-local-shift"])
@pytest.mark.parametrize("kind", ["one", "two"], ids=["one-candidate", "two-candidates"])
def test_finish_kernel_equals_aten_and_the_float64_statistics(affine: bool, about_local: bool, kind: str) -> None:
    batches = _rank_batches(1e4, 1e-2)
    ref_mean, ref_var, count = _reference(batches)
    shifts = _candidates(ref_mean, kind)
    summed = sum(_stats.pack_moments(_stats.local_moments(x), shifts) for x in batches)
    assert isinstance(summed, torch.Tensor)
    weight = torch.linspace(0.5, 1.5, 5) if affine else None
    bias = torch.linspace(-1, 1, 5) if affine else None
    about = _stats.local_moments(batches[0]).shift if about_local else None
    by_triton, by_aten = _finish_both(summed, shifts, about, weight, bias, in_place=kind == "two")
    for key, value in by_triton.items():
        torch.testing.assert_close(value, by_aten[key], rtol=2e-6, atol=1e-6, msg=key)

    # Against the float64 statistics of the data themselves (a wrongly chosen candidate fails invstd here).
    invstd = (ref_var + 1e-5).rsqrt()
    w = torch.ones(5, dtype=torch.float64) if weight is None else weight.double()
    b = torch.zeros(5, dtype=torch.float64) if bias is None else bias.double()
    mean32 = ref_mean.float()
    assert by_triton["int_count"].tolist() == [count]
    torch.testing.assert_close(by_triton["mean"], mean32, rtol=0, atol=0)
    torch.testing.assert_close(by_triton["invstd"].double(), invstd, rtol=1e-5, atol=0)
    torch.testing.assert_close(by_triton["residual"].double(), ref_mean - mean32.double(), rtol=1e-3, atol=1e-9)
    offset = ref_mean - (mean32.double() if about is None else about.double())
    torch.testing.assert_close(by_triton["beta"].double(), b - offset * w * invstd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(by_triton["coef"].double(),
                               torch.stack([-w * invstd / count, -w * invstd**3 / count]).float().double(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(by_triton["running_mean"].double(), 2.0 + 0.1 * (ref_mean - 2.0), rtol=1e-6, atol=0)
    unbiased = ref_var * count / (count - 1)
    torch.testing.assert_close(by_triton["running_var"].double(), 3.0 + 0.1 * (unbiased - 3.0), rtol=1e-6, atol=0)
    # The next candidates: this mean, then the candidate each channel chose (the near one).
    for values in (by_triton, by_aten):
        torch.testing.assert_close(values["next_shifts"][0], ref_mean, rtol=1e-12, atol=0)
        assert torch.equal(values["next_shifts"][1], ref_mean + 1e-3)


def test_finish_kernel_keeps_the_first_candidate_where_the_mean_is_not_finite() -> None:
    x = torch.randn(6, 5)
    x[0, 2], x[1, 4] = float("nan"), float("inf")
    shifts = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 1.5, 2.5, 3.5, 4.5]], dtype=torch.float64)
    summed = _stats.pack_moments(_stats.local_moments(x), shifts)
    for values in _finish_both(summed, shifts, None, None, None, in_place=True):
        following = values["next_shifts"]
        assert torch.isfinite(following).all(), following
        assert following[0, 2] == 3.0 and following[0, 4] == 5.0  # kept: the mean there is NaN / inf
        torch.testing.assert_close(following[0, :2], x[:, :2].double().mean(0), rtol=1e-6, atol=1e-6)


def test_finish_kernel_leaves_state_alone_without_buffers() -> None:
    summed = _stats.pack_moments(_stats.local_moments(torch.randn(6, 5)))
    shifts = torch.zeros(1, 5, dtype=torch.float64)
    _triton.finish_statistics(summed, shifts, None, None, None, 1e-5, torch.float32, None, None, 0.1, None, 5)
    assert torch.equal(shifts, torch.zeros(1, 5, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels compiled for the GPU)")
def test_kernels_compiled_for_cuda_equal_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    batches = _rank_batches(1e4, 1e-2)
    shift = _reference(batches)[0] + 1e-3
    for x in batches + [torch.randn(1, 5, 1)]:  # a count of 1 per channel too (not a Triton constant)
        local = _stats.local_moments(x)
        on_gpu = _stats.LocalMoments(*[t.cuda() if isinstance(t, torch.Tensor) else t for t in local])
        torch.testing.assert_close(_triton.pack_moments(on_gpu, shift.cuda()).cpu(), _stats.pack_moments(local, shift),
                                   rtol=1e-12, atol=1e-9)
    summed = sum(_stats.pack_moments(_stats.local_moments(x), shift) for x in batches)
    assert isinstance(summed, torch.Tensor)
    weight, bias = torch.linspace(0.5, 1.5, 5), torch.linspace(-1, 1, 5)
    on_gpu = _triton.finish_statistics(summed.cuda(), shift.cuda().view(1, 5), None, weight.cuda(), bias.cuda(),
                                       1e-5, torch.float32, None, None, 0.1, None, 5)
    on_cpu = _stats.finish_statistics(summed, shift.view(1, 5), None, weight, bias, 1e-5, torch.float32,
                                      coefficients=True, int_count=True)
    for key in ("mean", "invstd", "residual", "r_invstd2", "alpha", "beta", "coef", "int_count"):
        torch.testing.assert_close(getattr(on_gpu, key).cpu(), getattr(on_cpu, key), rtol=2e-6, atol=1e-6, msg=key)
