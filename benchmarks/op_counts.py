"""Ops dispatched by one training step of one syncnorm layer, per kernel backend and layout, on 2 Gloo ranks.

The counts are exact (not timings): tests/test_op_counts.py asserts them as budgets. Views, metadata ops
and ``empty*`` are not counted; the fused backend runs on the CPU stand-ins of tests/fused_cpu.py.

    PYTHONPATH=.:tests python benchmarks/op_counts.py
"""

from __future__ import annotations

import test_op_counts
from distributed import run_on_ranks

if __name__ == "__main__":
    print("| backend | layout | forward ops | backward ops | host syncs |")
    print("|---|---|---|---|---|")
    for kernels in test_op_counts.BUDGETS:
        for layout in test_op_counts.LAYOUTS:
            report = run_on_ranks(2, test_op_counts.rank_count_ops, layout, kernels)[0]
            print(f"| {kernels} | {layout} | {len(report['forward'])} | {len(report['backward'])} | "
                  f"{len(report['syncs'])} |")
