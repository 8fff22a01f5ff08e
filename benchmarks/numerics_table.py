"""Why sums about zero are enough for float32/half input, and why float64 input takes a second all-reduce.

For data of growing mean/std, the largest error of the normalised output against torch's BatchNorm in
float64 on the same data (the oracle of the tests), for:

- torch's own float32 BatchNorm, one process (the bar: syncnorm promises at most twice its error);
- syncnorm on float32 input: each of 4 simulated ranks' moments about its own mean, summed in float64
  about ZERO (ONE all-reduce of 2C+1 values), normalised per rank: the code path of a training step;
- the same sums about zero for float64 input (what one all-reduce would give; not used);
- syncnorm on float64 input: the global mean first, then the sums about it (TWO all-reduces: used).

The ranks are simulated by summing their packed buffers in one process (the all-reduce is a sum), so
the script needs no process group. Deterministic (seeded); a few seconds on a CPU.

    PYTHONPATH=. python benchmarks/numerics_table.py
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from syncnorm import _backends, _stats

CASES = [(0.0, 1.0), (1e3, 1.0), (1e4, 1e-2), (1e5, 1.0), (1e6, 1.0)]
SIZES = [5, 3, 8, 4]  # samples on each simulated rank
SHAPE = (8, 16)  # channels, values per sample and channel


def _syncnorm_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     two_passes: Optional[bool]) -> torch.Tensor:
    """syncnorm's training output on ``x`` split into ``SIZES`` ranks (native kernels, the CPU path), as
    ``_function.merged_statistics`` computes it.

    ``two_passes``: None to let syncnorm choose by dtype (what a layer does); False to force sums about zero.
    """
    parts = [p.contiguous() for p in x.split(SIZES)]
    backend = _backends.NATIVE
    outputs = []
    # The step's own functions on every simulated rank; the all-reduce is a sum over the ranks' buffers.
    locals_ = [backend.local_moments(p, None) for p in parts]

    def summed(shift: Optional[torch.Tensor]) -> torch.Tensor:
        return sum(backend.pack(local, shift) for local in locals_)  # type: ignore[return-value]

    shift = None
    if two_passes is None:
        two_passes = x.dtype == torch.float64
    if two_passes:
        shift = _stats.global_mean(summed(None)[: 1 + x.shape[1]])
    total = summed(shift)
    for part, local in zip(parts, locals_):
        stats = _backends.finish_statistics(backend, total, local, shift, weight.to(_stats.statistics_dtype(part)),
                                            bias.to(_stats.statistics_dtype(part)), 1e-5,
                                            _stats.statistics_dtype(part), None, None, 0.1)
        outputs.append(backend.normalize(part, local, stats, weight))
    return torch.cat(outputs)


def _error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return (y.double() - reference).abs().max().item()


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    channels, width = SHAPE
    print("| data mean / std | torch float32 BatchNorm | syncnorm, float32 input (1 all-reduce, sums about zero) "
          "| float64 input, sums about zero (1 all-reduce, not used) | syncnorm, float64 input (2 all-reduces) |")
    print("|---|---|---|---|---|")
    for mean, std in CASES:
        noise = torch.randn(sum(SIZES), channels, width, generator=generator, dtype=torch.float64)
        offsets = torch.randn(1, channels, 1, generator=generator, dtype=torch.float64)
        data = mean + std * (offsets + noise)
        weight = torch.rand(channels, generator=generator) + 0.5
        bias = torch.randn(channels, generator=generator)
        x32, x64 = data.float(), data
        reference32 = F.batch_norm(x32.double(), None, None, weight.double(), bias.double(), training=True)
        reference64 = F.batch_norm(x64, None, None, weight.double(), bias.double(), training=True)
        torch32 = F.batch_norm(x32, None, None, weight, bias, training=True)
        row = [
            _error(torch32, reference32),
            _error(_syncnorm_output(x32, weight, bias, None), reference32),
            _error(_syncnorm_output(x64, weight.double(), bias.double(), False), reference64),
            _error(_syncnorm_output(x64, weight.double(), bias.double(), None), reference64),
        ]
        print(f"| {mean:g} / {std:g} | " + " | ".join(f"{value:.1e}" for value in row) + " |")


if __name__ == "__main__":
    main()
