"""The CPU benchmark at three shapes: syncnorm vs local nn.BatchNorm2d, W=2 and W=4 Gloo ranks, one thread each.

The shapes (32,64,28,28), (8,256,14,14) and (256,512) per rank, forward+backward, slowest rank's
median, ratios measured in the same run. It is ``bench_layer.py`` with those shapes; see there for
the method (interleaved variants, A/A noise row, naive all-reduce SyncBN, communication model).

Run:
    PYTHONPATH=. python benchmarks/bench_cpu.py
"""

from __future__ import annotations

import sys

from bench_layer import main

if __name__ == "__main__":
    main(["--world-sizes", "2", "4", "--shapes", "(32,64,28,28)", "(8,256,14,14)", "(256,512)", *sys.argv[1:]])
