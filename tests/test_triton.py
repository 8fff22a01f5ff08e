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
@pytest.mark.parametrize("with_shift", [False, True], ids=["no-shift", "shift"])
def test_pack_kernel_equals_aten_and_merges_to_the_float64_moments(mean: float, std: float, with_shift: bool) -> None:
    batches = _rank_batches(mean, std)
    ref_mean, ref_var, count = _reference(batches)
    shift = (ref_mean + 0.5 * std) if with_shift else None  # a common shift near (not at) the mean
    packed_triton = torch.zeros(11, dtype=torch.float64)
    for x in batches:
        local = _stats.local_moments(x)
        triton_packed = _triton.pack_moments(local, shift)
        aten_packed = _stats.pack_moments(local, shift)
        torch.testing.assert_close(triton_packed, aten_packed, rtol=1e-12, atol=1e-12 * count * max(std, 1.0))
        packed_triton += triton_packed
    merged = _stats.unpack_moments(packed_triton, shift)
    assert merged.num_values.item() == count
    torch.testing.assert_close(merged.mean, ref_mean, rtol=0, atol=1e-6 * std)  # float32 local sums
    # About zero (no shift) a float64 merge keeps ~1e-16 (mean / std)^2 of the variance (_stats docstring).
    far = 0.0 if with_shift else (mean / std) ** 2
    torch.testing.assert_close(merged.var, ref_var, rtol=1e-5 + 4e-16 * far, atol=0)


def _finish_both(summed: torch.Tensor, shift: Optional[torch.Tensor], about: Optional[torch.Tensor],
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> tuple[dict, dict]:
    results = []
    for use_triton in (True, False):
        running_mean, running_var = torch.full((5,), 2.0), torch.full((5,), 3.0)
        shift_copy = None if shift is None else shift.clone()
        if use_triton:
            stats = _triton.finish_statistics(summed, shift_copy, about, weight, bias, 1e-5, torch.float32,
                                              running_mean, running_var, 0.1, True)
        else:
            stats = _stats.finish_statistics(summed, shift_copy, about, weight, bias, 1e-5, torch.float32,
                                             coefficients=True, int_count=True)
            _stats.update_running_statistics(running_mean, running_var, stats, 0.1)
            if shift_copy is not None:
                assert stats.moments is not None
                shift_copy.copy_(stats.moments[0])
        values = {key: getattr(stats, key) for key in ("mean", "invstd", "residual", "r_invstd2", "alpha", "beta",
                                                        "coef", "int_count")}
        values.update(running_mean=running_mean, running_var=running_var, shift=shift_copy)
        results.append(values)
    return results[0], results[1]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("about_local", [False, True], ids=["about-mean", "about-local-shift"])
def test_finish_kernel_equals_aten_and_the_float64_statistics(affine: bool, about_local: bool) -> None:
    batches = _rank_batches(1e4, 1e-2)
    ref_mean, ref_var, count = _reference(batches)
    shift = ref_mean + 1e-3
    summed = sum(_stats.pack_moments(_stats.local_moments(x), shift) for x in batches)
    assert isinstance(summed, torch.Tensor)
    weight = torch.linspace(0.5, 1.5, 5) if affine else None
    bias = torch.linspace(-1, 1, 5) if affine else None
    about = _stats.local_moments(batches[0]).shift if about_local else None
    by_triton, by_aten = _finish_both(summed, shift, about, weight, bias)
    for key, value in by_triton.items():
        torch.testing.assert_close(value, by_aten[key], rtol=2e-6, atol=1e-6, msg=key)

    # Against the float64 statistics of the data themselves.
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
    torch.testing.assert_close(by_triton["shift"], ref_mean, rtol=1e-12, atol=0)


def test_finish_kernel_leaves_state_alone_without_buffers() -> None:
    summed = _stats.pack_moments(_stats.local_moments(torch.randn(6, 5)))
    shift = torch.zeros(5, dtype=torch.float64)
    _triton.finish_statistics(summed, shift, None, None, None, 1e-5, torch.float32, None, None, 0.1, False)
    assert torch.equal(shift, torch.zeros(5, dtype=torch.float64))


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
    on_gpu = _triton.finish_statistics(summed.cuda(), shift.cuda().clone(), None, weight.cuda(), bias.cuda(), 1e-5,
                                       torch.float32, None, None, 0.1, False)
    on_cpu = _stats.finish_statistics(summed, shift, None, weight, bias, 1e-5, torch.float32, coefficients=True,
                                      int_count=True)
    for key in ("mean", "invstd", "residual", "r_invstd2", "alpha", "beta", "coef", "int_count"):
        torch.testing.assert_close(getattr(on_gpu, key).cpu(), getattr(on_cpu, key), rtol=2e-6, atol=1e-6, msg=key)
