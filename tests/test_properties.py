"""Property-based tests of the statistics merge (``syncnorm._stats``), against float64 on the whole batch.

For ANY split of a batch over ranks (empty parts included), any channel count and offsets up to 1e6
times the spread, merging the ranks' packed moments gives the float64 mean and variance of the whole
batch, within a bound derived from the arithmetic the merge does (not tuned to the results):

* each rank, in its statistics dtype (unit roundoff ``u``; float32 for float32 input): the shift
  ``c = fl(sum x / n)``, off the local mean ``m_r`` by at most ``s_r = gamma(n+1) max|x|``; the
  deviations ``d = fl(x - c)``; ``sum d`` and ``sum d^2``, which any summation order computes within
  ``gamma(n+1) sum |x - c|`` and ``gamma(n+3) sum (x - c)^2`` (terms of one sign);
* then float64 (unit roundoff ``u64``): the sums ``n c + sum d`` and ``sum d^2 + 2 c sum d + n c^2``,
  their sum over W ranks, and ``var = S2/N - (S1/N)^2``, each step a few roundings of terms no larger
  than ``8 sum x^2 + 4 N mean^2``.
An error in ``sum d`` moves ``S2/N`` and ``(S1/N)^2`` together; only ``2 |c - mean|`` times it reaches
the variance. Here ``gamma(k) = k u / (1 - k u)`` (Higham, Accuracy and Stability of Numerical
Algorithms, section 3.1). With |mean| = 1e6 std the float64 term is ~1e-3 of the variance: it is
what float64 sums can promise, and float32 sums would miss it by eight orders of magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncnorm import _stats

U64 = 2.0**-53
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: U64}
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: thread pools only add overhead (20x on a loaded two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gamma(k: float, u: float) -> float:
    return k * u / (1 - k * u)


def _merge(parts: list[torch.Tensor]) -> SimpleNamespace:
    """What W ranks compute: pack each part's moments, sum the buffers (the all-reduce), finish the statistics."""
    packed = [_stats.pack_moments(_stats.local_moments(p)) for p in parts]
    summed = torch.stack(packed).sum(0)
    stats = _stats.finish_statistics(summed, None, None, None, None, 1e-5, torch.float32, coefficients=False,
                                     int_count=False)
    assert stats.moments is not None
    return SimpleNamespace(num_values=stats.num_values, mean=stats.moments[0], var=stats.moments[1])


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    """(values, C) float64 view of an (N, C, ...) batch."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1).T


def error_bounds(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds on |mean - exact| and |var - exact| for ``_merge(parts)``, from the data alone."""
    u = UNIT_ROUNDOFF[_stats.statistics_dtype(parts[0])]
    whole = torch.cat([_per_channel(p) for p in parts])
    n_total, world = whole.shape[0], len(parts)
    mean = whole.mean(0)
    sum_sq = whole.square().sum(0)
    sum_abs = whole.abs().sum(0)
    mean_error = torch.zeros_like(mean)
    var_error = torch.zeros_like(mean)
    for part in parts:
        values = _per_channel(part)
        n = values.shape[0]
        if n == 0:
            continue
        local_mean = values.mean(0)
        shift_error = gamma(n + 1, u) * values.abs().max(0).values  # s_r
        sum_sq_about_shift = (values - local_mean).square().sum(0) + n * shift_error.square()
        sum_abs_about_shift = (values - local_mean).abs().sum(0) + n * shift_error
        sum_dev_error = gamma(n + 1, u) * sum_abs_about_shift
        mean_error += sum_dev_error / n_total
        var_error += gamma(n + 3, u) * sum_sq_about_shift / n_total
        var_error += 2 * ((local_mean - mean).abs() + shift_error) * sum_dev_error / n_total
        var_error += (sum_dev_error / n_total).square()
    float64_steps = gamma(world + 8, U64)
    mean_error += float64_steps * sum_abs / n_total + gamma(n_total + 2, U64) * sum_abs / n_total  # + the oracle's
    var_error += float64_steps * (8 * sum_sq / n_total + 4 * mean.square())
    var_error += gamma(2 * n_total + 4, U64) * whole.var(0, correction=0)  # the oracle's own two-pass error
    return mean_error, var_error


@st.composite
def split_batches(draw: st.DrawFn) -> list[torch.Tensor]:
    """A batch of shape (N, C[, L]) with per-channel offset and spread, split into W parts (some empty)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    channels = draw(st.integers(1, 5))
    extra = draw(st.sampled_from([(), (1,), (3,)]))
    sizes = draw(st.lists(st.integers(0, 6), min_size=1, max_size=6).filter(lambda s: sum(s) > 0))
    spread = torch.tensor([10.0 ** draw(st.floats(-3, 3)) for _ in range(channels)], dtype=torch.float64)
    # |mean| / std from 0 to 1e6, either sign; a constant channel now and then.
    ratio = torch.tensor([draw(st.sampled_from([0.0, 1e6]) | st.floats(0, 6).map(lambda e: 10.0**e))
                          * draw(st.sampled_from([1.0, -1.0])) for _ in range(channels)], dtype=torch.float64)
    constant = torch.tensor([draw(st.booleans()) and draw(st.booleans()) for _ in range(channels)])
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (sum(sizes), channels, *extra)
    view = (1, channels, *[1] * len(extra))
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.where(constant.view(view), torch.zeros_like(noise), noise)
    x = ((ratio * spread).view(view) + spread.view(view) * noise).to(dtype)
    return list(x.split(sizes))


@SETTINGS
@given(split_batches())
def test_any_split_merges_to_the_float64_statistics_of_the_whole_batch(parts: list[torch.Tensor]) -> None:
    merged = _merge(parts)
    whole = torch.cat([_per_channel(p) for p in parts])
    assert merged.num_values.dtype == torch.float64 and int(merged.num_values) == whole.shape[0]
    mean_error, var_error = error_bounds(parts)
    mean_miss = (merged.mean - whole.mean(0)).abs()
    var_miss = (merged.var - whole.var(0, correction=0)).abs()
    assert bool((mean_miss <= mean_error).all()), (mean_miss, mean_error)
    assert bool((var_miss <= var_error).all()), (var_miss, var_error)


@SETTINGS
@given(split_batches(), st.randoms(use_true_random=False))
def test_the_merge_does_not_depend_on_which_rank_holds_which_part(parts: list[torch.Tensor], rng: object) -> None:
    shuffled = list(parts)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    a, b = _merge(parts), _merge(shuffled)
    mean_error, var_error = error_bounds(parts)
    # Both are within the bound of the exact value, so within twice the bound of each other.
    assert bool(((a.mean - b.mean).abs() <= 2 * mean_error).all())
    assert bool(((a.var - b.var).abs() <= 2 * var_error).all())


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 5))
def test_an_all_empty_batch_merges_to_count_zero(world: int, channels: int) -> None:
    merged = _merge([torch.empty(0, channels, 2) for _ in range(world)])
    assert int(merged.num_values) == 0
    assert merged.mean.shape == merged.var.shape == (channels,)


def test_the_bound_is_tight_enough_to_catch_float32_sums() -> None:
    """The bound is not vacuous: the naive float32 sum / sum-of-squares merge breaks it on offset data."""
    generator = torch.Generator().manual_seed(0)
    x = (1e3 + torch.randn(40, 2, generator=generator, dtype=torch.float64)).float()
    parts = list(x.split([15, 0, 25]))
    _, var_error = error_bounds(parts)
    s1 = sum(p.sum(0) for p in parts)
    s2 = sum(p.square().sum(0) for p in parts)
    naive_var = (s2 / 40 - (s1 / 40) ** 2).double()
    exact = x.double().var(0, correction=0)
    assert bool(((naive_var - exact).abs() > var_error).any())
    assert math.isfinite(float(var_error.max()))
