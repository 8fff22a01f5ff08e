"""The statistics merge alone (no processes): any split of a batch merges to the whole batch's moments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from syncnorm import _stats


def _merge(parts: list[torch.Tensor]) -> SimpleNamespace:
    """What W ranks compute: pack each part's moments, sum the buffers (the all-reduce), finish the statistics."""
    packed = [_stats.pack_moments(_stats.local_moments(p)) for p in parts]
    summed = torch.stack(packed).sum(0)
    stats = _stats.finish_statistics(summed, None, None, None, None, 1e-5, torch.float32, coefficients=False,
                                     int_count=False)
    assert stats.moments is not None
    return SimpleNamespace(num_values=stats.num_values, mean=stats.moments[0], var=stats.moments[1])


@pytest.mark.parametrize("sizes", [[7], [3, 4], [0, 5, 0, 2], [1, 1, 1, 1, 1, 1]], ids=str)
def test_merge_of_any_split_is_the_whole_batch(sizes: list[int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(sum(sizes), 4, 3) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1) + 5
    merged = _merge(list(x.split(sizes)))
    x64 = x.double()
    assert int(merged.num_values) == sum(sizes) * 3
    torch.testing.assert_close(merged.mean, x64.mean((0, 2)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged.var, x64.var((0, 2), correction=0), rtol=1e-5, atol=1e-7)


def test_large_offset_small_spread_is_exact_where_float32_sums_fail() -> None:
    torch.manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(64, 3, 8, 8, dtype=torch.float64)).float()
    expected = x.double().var((0, 2, 3), correction=0)
    merged = _merge(list(x.split([20, 30, 14])))
    # What torch's own single-process float32 BatchNorm gets wrong, on the same data:
    _, torch_var = torch.batch_norm_update_stats(x, None, None, 0.0)
    torch_error = ((torch_var.double() - expected) / expected).abs().max()
    ours_error = ((merged.var - expected) / expected).abs().max()
    assert ours_error <= torch_error * 2
    # The naive float32 sum and sum of squares, for contrast, is far off.
    s1, s2 = x.sum((0, 2, 3)), x.square().sum((0, 2, 3))
    n = x.numel() / 3
    naive = s2 / n - (s1 / n) ** 2
    assert ((naive.double() - expected) / expected).abs().max() > 10 * ours_error
