"""Two CPU ranks on Gloo, each with half a batch: syncnorm's statistics next to one process's on the whole batch.

Run: python examples/quick_check.py   (or `make demo`)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import syncnorm

WORLD_SIZE = 2
CHANNELS = 4


def global_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    # Each rank's half has a different mean: local statistics disagree, global ones do not.
    first = torch.randn(4, CHANNELS, 8, 8, generator=generator)
    second = torch.randn(4, CHANNELS, 8, 8, generator=generator) * 3 + 2
    return torch.cat([first, second])


def rank_main(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    x = global_batch().chunk(WORLD_SIZE)[rank]
    synced, local = syncnorm.SyncBatchNorm(CHANNELS), torch.nn.BatchNorm2d(CHANNELS)
    synced(x), local(x)
    results[rank] = (synced.running_mean.clone(), synced.running_var.clone(),
                     local.running_mean.clone(), local.running_var.clone())
    dist.destroy_process_group()


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(port, results), nprocs=WORLD_SIZE)
        results = dict(results)
    whole = torch.nn.BatchNorm2d(CHANNELS).double()
    whole(global_batch().double())
    torch.set_printoptions(precision=6, sci_mode=False)
    print(f"running statistics after one training step, {WORLD_SIZE} Gloo ranks of 4 samples each\n")
    print("one process, whole batch (float64):  mean", whole.running_mean.float(), " var", whole.running_var.float())
    for rank in range(WORLD_SIZE):
        mean, var, local_mean, local_var = results[rank]
        print(f"rank {rank} syncnorm.SyncBatchNorm:       mean", mean, " var", var)
        print(f"rank {rank} torch.nn.BatchNorm2d (local): mean", local_mean, " var", local_var)
    worst = max((results[r][0].double() - whole.running_mean).abs().max().item() for r in range(WORLD_SIZE))
    print(f"\nlargest difference of syncnorm's running_mean from the single process: {worst:.2e}")


if __name__ == "__main__":
    main()
