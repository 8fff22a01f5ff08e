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


def _common_shift(batches: list[torch.Tensor]) -> torch.Tensor:
    """The shift float64 input is packed about: the global mean from the rank-summed [n, sum x] about zero."""
    channels = batches[0].shape[1]
    head = sum(_stats.pack_moments(_stats.local_moments(x))[: 1 + channels] for x in batches)
    assert isinstance(head, torch.Tensor)
    return _stats.global_mean(head)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1e4, 1e-2)], ids=["standard", "large-mean"])
@pytest.mark.parametrize("about", ["zero", "common-shift"])
def test_pack_kernel_equals_aten_and_merges_to_the_float64_moments(mean: float, std: float, about: str) -> None:
    batches = _rank_batches(mean, std)
    ref_mean, ref_var, count = _reference(batches)
    shift = _common_shift(batches) if about == "common-shift" else None
    packed_triton = torch.zeros(1 + 2 * 5, dtype=torch.float64)
    for x in batches:
        local = _stats.local_moments(x)
        triton_packed = _triton.pack_moments(local, shift)
        aten_packed = _stats.pack_moments(local, shift)
        assert triton_packed.shape == aten_packed.shape == (1 + 2 * 5,)
        torch.testing.assert_close(triton_packed, aten_packed, rtol=1e-12, atol=1e-12 * count * max(mean, std, 1.0))
        packed_triton += triton_packed
    merged = _stats.finish_statistics(packed_triton, shift, None, None, None, 1e-5, torch.float64,
                                      coefficients=False, int_count=False)
    assert merged.num_values.item() == count and merged.moments is not None
    merged_mean, merged_var = merged.moments
    torch.testing.assert_close(merged_mean, ref_mean, rtol=0, atol=1e-6 * std)  # float32 local sums
    # About zero a float64 merge keeps ~1e-16 (mean / std)^2 of the variance (_stats docstring); about the
    # global mean, float64's rounding only.
    far = (mean / std) ** 2 if shift is None else 0.0
    torch.testing.assert_close(merged_var, ref_var, rtol=1e-5 + 4e-16 * far, atol=0)


def _finish_both(summed: torch.Tensor, shift: Optional[torch.Tensor], about: Optional[torch.Tensor],
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], dtype: torch.dtype,
                 guard_empty: bool = False) -> tuple[dict, dict]:
    """The Triton kernel's values, and those of ``_stats.finish_statistics`` + ``update_running_statistics``."""
    results = []
    for use_triton in (True, False):
        running_mean, running_var = torch.full((5,), 2.0, dtype=dtype), torch.full((5,), 3.0, dtype=dtype)
        if use_triton:
            stats = _triton.finish_statistics(summed, shift, about, weight, bias, 1e-5, dtype,
                                              running_mean, running_var, 0.1, 5)
        else:
            stats = _stats.finish_statistics(summed, shift, about, weight, bias, 1e-5, dtype,
                                             coefficients=True, int_count=True)
            _stats.update_running_statistics(running_mean, running_var, stats, 0.1, guard_empty=guard_empty)
        values = {key: getattr(stats, key) for key in ("mean", "invstd", "residual", "r_invstd2", "alpha", "beta",
                                                        "coef", "int_count")}
        values.update(running_mean=running_mean, running_var=running_var)
        results.append(values)
    return results[0], results[1]


# (data mean, data std, packed about, statistics dtype): float32/half input sums about zero, float64 input
# about the global mean (_function.merged_statistics); each kernel also with the other dtype.
FINISH_CASES = {
    "about-zero-float32": (3.0, 0.5, "zero", torch.float32),
    "about-zero-float64": (3.0, 0.5, "zero", torch.float64),
    "common-shift-float64": (1e4, 1e-2, "common-shift", torch.float64),
    "common-shift-float32": (1e4, 1e-2, "common-shift", torch.float32),
}


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("about_local", [False, True], ids=["about-mean", "about-local-shift"])
@pytest.mark.parametrize("case", FINISH_CASES, ids=list(FINISH_CASES))
def test_finish_kernel_equals_aten_and_the_float64_statistics(affine: bool, about_local: bool, case: str) -> None:
    mean, std, packed_about, dtype = FINISH_CASES[case]
    batches = _rank_batches(mean, std)
    ref_mean, ref_var, count = _reference(batches)
    shift = _common_shift(batches) if packed_about == "common-shift" else None
    summed = sum(_stats.pack_moments(_stats.local_moments(x), shift) for x in batches)
    assert isinstance(summed, torch.Tensor)
    weight = torch.linspace(0.5, 1.5, 5, dtype=dtype) if affine else None
    bias = torch.linspace(-1, 1, 5, dtype=dtype) if affine else None
    about = _stats.local_moments(batches[0]).shift.to(dtype) if about_local else None
    by_triton, by_aten = _finish_both(summed, shift, about, weight, bias, dtype)
    for key, value in by_triton.items():  # the same float64 operations, rounded once: bit for bit
        assert value.dtype == by_aten[key].dtype, key
        assert torch.equal(value, by_aten[key]), (key, (value != by_aten[key]).sum().item())

    # Against the float64 statistics of the data themselves (sums about a wrong shift fail invstd here).
    invstd = (ref_var + 1e-5).rsqrt()
    w = torch.ones(5, dtype=torch.float64) if weight is None else weight.double()
    b = torch.zeros(5, dtype=torch.float64) if bias is None else bias.double()
    rounded = ref_mean.to(dtype)
    assert by_triton["int_count"].tolist() == [count]
    # float32: the float64 mean rounded; float64: the mean itself, to a few ulps of the float64 sums.
    torch.testing.assert_close(by_triton["mean"], rounded, rtol=0 if dtype == torch.float32 else 1e-14, atol=0)
    torch.testing.assert_close(by_triton["invstd"].double(), invstd, rtol=1e-5, atol=0)
    torch.testing.assert_close(by_triton["residual"].double(), ref_mean - rounded.double(), rtol=1e-3, atol=1e-9)
    offset = ref_mean - (rounded.double() if about is None else about.double())
    torch.testing.assert_close(by_triton["beta"].double(), b - offset * w * invstd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(by_triton["coef"].double(),
                               torch.stack([-w * invstd / count, -w * invstd**3 / count]).to(dtype).double(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(by_triton["running_mean"].double(), 2.0 + 0.1 * (ref_mean - 2.0), rtol=1e-6, atol=0)
    unbiased = ref_var * count / (count - 1)
    torch.testing.assert_close(by_triton["running_var"].double(), 3.0 + 0.1 * (unbiased - 3.0), rtol=1e-6, atol=0)


# 0 / 0 in the interpreter (numpy warns): the statistics of an empty batch are NaN, as on the GPU.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_finish_kernel_rounds_every_value_as_aten_does_on_random_batches() -> None:
    """Twenty random float32 batches of 64 channels: every per-channel value and running statistic of the
    Triton kernel is bitwise the aten reference's (eager and compiled steps then keep the same buffers)."""
    generator = torch.Generator().manual_seed(4)
    for _ in range(20):
        x = torch.randn(32, 64, 5, 5, generator=generator) * 3 + 2
        local = _stats.local_moments(x)
        summed = _stats.pack_moments(local)
        weight, bias = torch.rand(64, generator=generator) + 0.5, torch.randn(64, generator=generator)
        buffers = [(torch.randn(64, generator=generator), torch.rand(64, generator=generator) + 0.5)]
        buffers.append(tuple(b.clone() for b in buffers[0]))
        by_triton = _triton.finish_statistics(summed, None, local.shift, weight, bias, 1e-5, torch.float32,
                                              *buffers[0], 0.1, 64)
        by_aten = _stats.finish_statistics(summed, None, local.shift, weight, bias, 1e-5, torch.float32,
                                           coefficients=True, int_count=True)
        _stats.update_running_statistics(*buffers[1], by_aten, 0.1)
        for key in ("mean", "invstd", "residual", "r_invstd2", "alpha", "beta", "coef", "int_count"):
            assert torch.equal(getattr(by_triton, key), getattr(by_aten, key)), key
        assert torch.equal(buffers[0][0], buffers[1][0]) and torch.equal(buffers[0][1], buffers[1][1])


def test_finish_kernel_keeps_the_running_statistics_of_an_empty_global_batch() -> None:
    """A global count of zero (every value NaN): the kernel keeps the running statistics, as the guarded aten update."""
    summed = torch.zeros(1 + 2 * 5, dtype=torch.float64)
    by_triton, by_aten = _finish_both(summed, None, None, None, None, torch.float32, guard_empty=True)
    for values in (by_triton, by_aten):
        assert torch.equal(values["running_mean"], torch.full((5,), 2.0))
        assert torch.equal(values["running_var"], torch.full((5,), 3.0))
        assert values["int_count"].tolist() == [0]


def test_finish_kernel_leaves_its_inputs_alone_without_buffers() -> None:
    """Without running statistics the kernel writes only its own outputs (not the buffer or the shift it reads)."""
    x = torch.randn(6, 5) + 4
    shift = _common_shift([x])
    summed = _stats.pack_moments(_stats.local_moments(x), shift)
    summed_before, shift_before = summed.clone(), shift.clone()
    stats = _triton.finish_statistics(summed, shift, None, None, None, 1e-5, torch.float32, None, None, 0.1, 5)
    assert torch.equal(summed, summed_before) and torch.equal(shift, shift_before)
    torch.testing.assert_close(stats.mean, x.double().mean(0).float(), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels compiled for the GPU)")
def test_kernels_compiled_for_cuda_equal_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    batches = _rank_batches(1e4, 1e-2)
    for shift in (None, _common_shift(batches)):  # about zero, and about the global mean (float64 input)
        on_device = None if shift is None else shift.cuda()
        for x in batches + [torch.randn(1, 5, 1)]:  # a count of 1 per channel too (not a Triton constant)
            local = _stats.local_moments(x)
            on_gpu = _stats.LocalMoments(*[t.cuda() if isinstance(t, torch.Tensor) else t for t in local])
            torch.testing.assert_close(_triton.pack_moments(on_gpu, on_device).cpu(), _stats.pack_moments(local, shift),
                                       rtol=1e-12, atol=1e-9)
        summed = sum(_stats.pack_moments(_stats.local_moments(x), shift) for x in batches)
        assert isinstance(summed, torch.Tensor)
        weight, bias = torch.linspace(0.5, 1.5, 5), torch.linspace(-1, 1, 5)
        running = [torch.full((5,), 2.0), torch.full((5,), 3.0)]
        running_gpu = [t.cuda() for t in running]
        on_gpu = _triton.finish_statistics(summed.cuda(), on_device, None, weight.cuda(), bias.cuda(),
                                           1e-5, torch.float32, *running_gpu, 0.1, 5)
        on_cpu = _stats.finish_statistics(summed, shift, None, weight, bias, 1e-5, torch.float32,
                                          coefficients=True, int_count=True)
        _stats.update_running_statistics(*running, on_cpu, 0.1)
        for key in ("mean", "invstd", "residual", "r_invstd2", "alpha", "beta", "coef", "int_count"):
            torch.testing.assert_close(getattr(on_gpu, key).cpu(), getattr(on_cpu, key), rtol=2e-6, atol=1e-6,
                                       msg=key)
        for gpu, cpu in zip(running_gpu, running):
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-6, atol=1e-6)
