"""Survive a lost worker: checkpoint, let torchrun restart the job, resume, end as if nothing happened.

torchrun's elastic agent restarts every worker of the job when one dies (``--max-restarts N``). A
restarted worker is a new process: it has only what is on disk. This script is the pattern that makes
the restarted job end exactly where an uninterrupted one ends:

- the data of step ``t`` is a function of ``t`` alone (an epoch's shuffle is seeded by the epoch), so a
  job that resumes at step ``t`` feeds the batches it would have fed;
- every ``--every`` steps rank 0 saves the step, the model's ``state_dict`` (parameters, running
  statistics, ``num_batches_tracked``) and the optimizer's, to a temporary file renamed over the
  checkpoint (a crash mid-write leaves the previous checkpoint whole);
- at start every rank loads the checkpoint if there is one, before the DistributedDataParallel wrap;
- each attempt joins its process group under a store prefix of its own (``init_process_group`` below
  says why).

syncnorm layers keep the state_dict of BatchNorm, so the checkpoint is that of the plain model. A
multi-node job needs the checkpoint on a file system every node reads.

    torchrun --nnodes 1 --nproc-per-node 2 --max-restarts 1 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29400 examples/train_elastic.py --kill-at 5

``--kill-at STEP`` makes rank ``--kill-rank`` SIGKILL itself before that step, in the first attempt
only (``TORCHELASTIC_RESTART_COUNT`` is 0): the demonstration of a lost worker. Rank 0 prints the loss
of each step, where it resumed, and saves the final state to ``--final``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import syncnorm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps in all")
    parser.add_argument("--global-batch", type=int, default=32, help="images a step, over all ranks")
    parser.add_argument("--every", type=int, default=4, help="save a checkpoint every this many steps")
    parser.add_argument("--checkpoint", type=Path, default=Path("out/elastic.pt"))
    parser.add_argument("--final", type=Path, default=Path("out/elastic-final.pt"), help="rank 0's final state")
    parser.add_argument("--kill-at", type=int, default=None, help="first attempt: SIGKILL a rank before this step")
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--late-rank0", type=float, default=0.0,
                        help="restarted attempts: rank 0 joins this many seconds late (exposes stale store keys)")
    return parser.parse_args()


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits (shipped inside the package), as (N, 1, 8, 8) images and labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target)


def build_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def global_batch(step: int, n: int, size: int) -> Tensor:
    """Indices of the global batch of ``step``: a function of the step alone, so a resumed job feeds the same."""
    per_epoch = n // size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    return order[position * size:(position + 1) * size]


def save_checkpoint(path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, partial)
    os.replace(partial, path)  # atomic: a reader sees the old checkpoint or the new one, never half of one


def init_process_group(timeout: datetime.timedelta) -> None:
    """``dist.init_process_group("gloo")``, with this attempt's keys kept apart from those of earlier attempts.

    With a c10d rendezvous, torchrun gives every attempt of the job the same TCPStore
    (``TORCHELASTIC_USE_AGENT_STORE=True``), and the keys the dead attempt wrote are still in it: a
    restarted rank can read a peer's address from the previous attempt and fail with Gloo's
    "Connection refused" (seen with torch 2.14.1). A prefix per attempt keeps the attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group("gloo", timeout=timeout)
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store), timeout=timeout,
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def main() -> None:
    args = parse_args()
    if args.late_rank0 and os.environ.get("RANK") == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        time.sleep(args.late_rank0)
    init_process_group(datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the world size {world}.")
    local = args.global_batch // world

    images, labels = load_digits()
    model = syncnorm.convert_model(build_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = 0
    if args.checkpoint.exists():
        state: dict[str, Any] = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    if rank == 0:
        print(f"attempt {attempt}: {world} ranks, starting at step {start}", flush=True)
    ddp = DistributedDataParallel(model)

    for step in range(start, args.steps):
        if args.kill_at == step and attempt == 0 and rank == args.kill_rank:
            print(f"rank {rank}: SIGKILL before step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        mine = global_batch(step, len(images), args.global_batch)[rank * local:(rank + 1) * local]
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(images[mine]), labels[mine])
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
            if (step + 1) % args.every == 0:
                save_checkpoint(args.checkpoint, step + 1, model, optimizer)

    if rank == 0:
        args.final.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "attempt": attempt,
                    "resumed_at": start}, args.final)
        print(f"done: {args.steps} steps, final state in {args.final}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
