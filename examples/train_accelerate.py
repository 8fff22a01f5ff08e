"""The digits CNN of train_digits.py, trained with Hugging Face Accelerate and syncnorm's conversion.

The whole change to an Accelerate script is one line before ``accelerator.prepare``:

    model = syncnorm.convert_model(model)

Run as ``python examples/train_accelerate.py`` it is one process (``DistributedType.NO``), where nothing is
synchronised and ``--check`` has nothing to compare (it exits with status 2). Launch it on 2 CPU processes
(Gloo; Accelerate starts them with mpirun, the config names the host file):

    accelerate launch --config_file launch/accelerate_cpu.yaml examples/train_accelerate.py

or on every GPU of the machine (NCCL) with ``accelerate launch --multi_gpu examples/train_accelerate.py``.
Accelerate's data loader gives process p the batches p, p + W, p + 2W, ... of the loader, so the global
batch of a step is the concatenation of W consecutive batches: the run is the same as one process
training on batches W times larger, which rank 0 checks at the end (``--check``). Like train_digits.py it
trains in float64 by default, so that float rounding, which SGD amplifies over many steps, stays far below
what ``--check`` prints (``--dtype float32`` to change).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import syncnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model and data of train_digits.py
from train_digits import (  # noqa: E402
    TRAIN_IMAGES,
    ArgumentParser,
    digits_net,
    global_batches,
    load_digits,
    positive_float,
    positive_int,
)

# Where the launchers put the process count and this process's rank on its machine: torchrun's variables,
# then MPI's (Accelerate starts multi-CPU jobs with mpirun). Read before Accelerator() forms the group.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _first_int(variables: tuple[str, ...], default: int) -> int:
    for name in variables:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return default


def train(accelerator: Optional[Accelerator], batch_per_process: int, world: int, steps: int, lr: float,
          seed: int, dtype: torch.dtype = torch.float64) -> tuple[list[float], nn.Module]:
    """Train with Accelerate on ``world`` processes, or (``accelerator=None``) as one process with the whole batch."""
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    data = load_digits(device, dtype)
    # One list of global batches for everyone; each batch of the loader is one process's part of a step.
    order = torch.cat(global_batches(len(data.train_y), batch_per_process * world, steps, seed))
    torch.manual_seed(seed)
    model: nn.Module = digits_net().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    samples = TensorDataset(data.train_x[order], data.train_y[order])
    if accelerator is None:
        loader = DataLoader(samples, batch_size=batch_per_process * world)
    else:
        model = syncnorm.convert_model(model)  # the one line syncnorm asks for
        loader = DataLoader(samples, batch_size=batch_per_process)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses = []
    model.train()
    for images, labels in loader:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        if accelerator is None:
            loss.backward()
        else:
            accelerator.backward(loss)
            loss = accelerator.reduce(loss.detach(), reduction="mean")  # the loss of the global batch
        optimizer.step()
        losses.append(loss.item())
    return losses, model if accelerator is None else accelerator.unwrap_model(model)


def parse_args(argv: Optional[list[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and check the arguments on every process, before Accelerate forms the group (usage error: exit 2)."""
    world = _first_int(WORLD_SIZE_VARIABLES, 1) if world_size is None else world_size
    # The parser prints a usage error on each machine's first process only.
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n")[0],
                            local_rank=_first_int(LOCAL_RANK_VARIABLES, 0))
    parser.add_argument("--steps", type=positive_int, default=100, help="training steps (default 100)")
    parser.add_argument("--batch-per-process", type=positive_int, default=4,
                        help=f"images a process sees each step (default 4); processes x this must be at most "
                        f"the {TRAIN_IMAGES} training images")
    parser.add_argument("--lr", type=positive_float, default=0.02, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="float64 (default) keeps rounding, which SGD amplifies over many steps, out of --check")
    parser.add_argument("--out", type=Path, default=None, help="write each process's final parameters here")
    parser.add_argument("--check", action="store_true",
                        help="rank 0 also trains one process on the whole batch and prints how far the curves are "
                        "(needs 2 or more processes)")
    args = parser.parse_args(argv)
    if world * args.batch_per_process > TRAIN_IMAGES:
        parser.error(f"--batch-per-process {args.batch_per_process} on {world} process(es) asks for a global batch "
                     f"of {world * args.batch_per_process} images, but the digits have {TRAIN_IMAGES} to train on; "
                     f"use --batch-per-process {TRAIN_IMAGES // world} or less")
    if args.check and world == 1:
        parser.error("--check compares the processes' run with one process on the whole batch, but this is one "
                     "process: nothing to compare. Start 2 with: accelerate launch --config_file "
                     "launch/accelerate_cpu.yaml examples/train_accelerate.py --check")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)

    # Gloo on CPU, NCCL on GPUs: Accelerate picks the backend from the device.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    accelerator.print(f"train_accelerate: {world} process(es), {accelerator.distributed_type}, device "
                      f"{accelerator.device.type}, {args.batch_per_process} images a process")
    if world == 1:
        accelerator.print("train_accelerate: one process, so nothing is synchronised; for 2 CPU processes: "
                          "accelerate launch --config_file launch/accelerate_cpu.yaml examples/train_accelerate.py")
    dtype = getattr(torch, args.dtype)
    losses, model = train(accelerator, args.batch_per_process, world, args.steps, args.lr, args.seed, dtype)
    accelerator.print(f"train loss: first step {losses[0]:.4f}, last step {losses[-1]:.4f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"rank": rank, "world_size": world, "losses": losses, "state_dict": state},
                   args.out / f"train_accelerate_rank{rank}.pt")
    if args.check and accelerator.is_main_process:
        single, _ = train(None, args.batch_per_process, world, args.steps, args.lr, args.seed, dtype)
        gap = max(abs(a - b) for a, b in zip(losses, single))
        print(f"largest difference from one process on the whole batch, over {len(losses)} steps: {gap:.2e}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
