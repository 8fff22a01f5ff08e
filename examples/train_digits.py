"""Why synchronised BatchNorm matters, on real images: scikit-learn's 8x8 digits, 4 images a rank.

The same small CNN trains three ways, from the same initial weights, on the same sequence of global
batches (the global batch of step t is the concatenation of the ranks' batches of step t):

- ``local``: DistributedDataParallel on W ranks, plain ``torch.nn.BatchNorm2d`` (each rank normalises
  with the statistics of its own 4 images);
- ``syncnorm``: the same, after ``model = syncnorm.convert_model(model)`` (statistics of all 4·W images);
- ``single``: one process that sees the whole global batch of 4·W images at every step (rank 0 runs it
  after the distributed runs; the other ranks are done by then).

The gradients of ``syncnorm`` and ``single`` are mathematically the same, so their loss curves must
coincide up to float rounding; ``local`` trains a different (noisier) model. Rank 0 prints a table
(final train loss, test accuracy, how far each run's loss curve and running statistics are from the
single process) and saves a plot of the three loss curves.

The backend follows the device: NCCL when CUDA is available (one GPU a rank, ``LOCAL_RANK``), Gloo on
CPU, so the same file runs on a GPU node and on a laptop. Launch it with:

    launch/torchrun.sh examples/train_digits.py                # every GPU, or 2 CPU processes on Gloo
    launch/torchrun.sh --nproc 4 examples/train_digits.py      # 4 ranks (`make demo` without GPU)

Run without a launcher it trains on one rank, where the three runs are the same model.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

import syncnorm

RUNS = ("local", "syncnorm", "single")


@dataclass
class Digits:
    """scikit-learn's digits (1797 images of 8x8 pixels, shipped inside the package) split 80/20."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass
class RunResult:
    """What one training run leaves behind, on rank 0."""

    losses: list[float] = field(default_factory=list)
    test_accuracy: float = 0.0
    running_stats: list[Tensor] = field(default_factory=list)
    state_dict: dict[str, Tensor] = field(default_factory=dict)


def digits_net() -> nn.Sequential:
    """A small CNN with BatchNorm after every convolution (about 25k parameters)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def _digits_arrays() -> tuple[Any, Any]:
    """scikit-learn's digits as numpy arrays: (1797, 64) pixels in 0..16 and (1797,) labels."""
    import importlib.util

    import numpy as np

    # Importing scikit-learn costs every rank seconds of start-up; the images are one CSV file inside it,
    # which is all sklearn.datasets.load_digits reads. Fall back to that function if the file ever moves.
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec and \
        spec.submodule_search_locations else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    return sklearn_digits(return_X_y=True)


def load_digits(device: torch.device, dtype: torch.dtype = torch.float32) -> Digits:
    """The digits as (N, 1, 8, 8) tensors of ``dtype`` in [0, 1], with a fixed train/test split."""
    images, labels = _digits_arrays()
    # A fixed shuffle, then 80 % to train: the same split on every rank and in every run.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234)).numpy()
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]

    def images_tensor(a: object) -> Tensor:
        return (torch.as_tensor(a, dtype=dtype) / 16.0).reshape(-1, 1, 8, 8).to(device)

    def labels_tensor(a: object) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long).to(device)

    return Digits(images_tensor(images[train]), labels_tensor(labels[train]),
                  images_tensor(images[test]), labels_tensor(labels[test]))


def global_batches(num_train: int, global_batch: int, steps: int, seed: int) -> list[Tensor]:
    """The sample indices of every step's global batch; every rank and every run computes the same list."""
    if not 1 <= global_batch <= num_train or steps < 1:  # else the loop below never ends, or returns nothing
        raise ValueError(f"global_batches expected 1 <= global_batch <= num_train ({num_train}) and steps >= 1, "
                         f"got global_batch {global_batch}, steps {steps}")
    batches: list[Tensor] = []
    epoch = 0
    while len(batches) < steps:
        order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed + epoch))
        whole = num_train // global_batch  # drop the last partial batch: every step has the full global batch
        batches.extend(order[i * global_batch:(i + 1) * global_batch] for i in range(whole))
        epoch += 1
    return batches[:steps]


def pick_device() -> tuple[torch.device, str]:
    """One GPU a rank and NCCL when CUDA is available, else the CPU and Gloo: no edit between the two."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def train(run: str, data: Digits, batches: list[Tensor], args: argparse.Namespace, device: torch.device,
          show_progress: bool) -> RunResult:
    """Train one way (``local``, ``syncnorm`` or ``single``) and return, on rank 0, what it produced."""
    distributed = run != "single"
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)  # the same initial weights in every run and on every rank
    model: nn.Module = digits_net().to(device, args.dtype)
    if run == "syncnorm":
        model = syncnorm.convert_model(model)
    net = model
    if run == "local":
        # DDP's default: rank 0's running statistics are copied to every rank before each forward.
        net = DistributedDataParallel(model)
    elif run == "syncnorm":
        # syncnorm's running statistics are equal on every rank already: no need to copy them each step.
        # (torch 2.14 renamed the argument; both names mean the same here.)
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync: dict[str, Any] = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        net = DistributedDataParallel(model, **no_buffer_sync)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    # Linear decay to zero: the final models (and their test accuracy) settle instead of hopping between minima.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / len(batches))

    from tqdm import tqdm

    result = RunResult()
    progress = tqdm(batches, desc=f"{run:>8}", disable=not show_progress, mininterval=1.0, leave=True,
                    dynamic_ncols=True)
    for indices in progress:
        mine = indices[rank * args.batch_per_rank:(rank + 1) * args.batch_per_rank] if distributed else indices
        mine = mine.to(device)
        loss = F.cross_entropy(net(data.train_x[mine]), data.train_y[mine])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        logged = loss.detach().clone()
        if distributed:
            # The loss of the global batch (every rank's batch has the same size), comparable with `single`.
            dist.all_reduce(logged)
            logged /= world
        result.losses.append(logged.item())
        if show_progress:
            progress.set_postfix(loss=f"{result.losses[-1]:.3f}", refresh=False)

    model.eval()
    with torch.no_grad():  # eval mode communicates nothing (and the single run has no group)
        predictions = model(data.test_x).argmax(dim=1)
    result.test_accuracy = (predictions == data.test_y).float().mean().item()
    for layer in model.modules():
        if isinstance(layer, _BatchNorm):
            stats = (layer.running_mean, layer.running_var)
            result.running_stats += [t.detach().cpu() for t in stats if t is not None]
    result.state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return result


def max_difference(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def report(results: dict[str, RunResult], world: int, args: argparse.Namespace) -> str:
    """The table rank 0 prints."""
    reference = results.get("single")
    tail = max(1, min(20, len(next(iter(results.values())).losses)))
    lines = [
        f"digits, {world} ranks x {args.batch_per_rank} images = global batch {world * args.batch_per_rank}, "
        f"{args.steps} steps, SGD lr {args.lr} decaying to 0, {str(args.dtype).replace('torch.', '')}",
        "",
        f"| run | final train loss (mean of last {tail} steps) | test accuracy "
        "| max abs loss difference from single, over all steps | max abs running-stats difference from single |",
        "|---|---|---|---|---|",
    ]
    names = {"local": f"local BatchNorm, {world} ranks", "syncnorm": f"syncnorm, {world} ranks",
             "single": "single process, whole batch"}
    for run, result in results.items():
        final = sum(result.losses[-tail:]) / tail
        if reference is None or run == "single":
            loss_diff = stats_diff = "-"
        else:
            loss_diff = f"{max(abs(a - b) for a, b in zip(result.losses, reference.losses)):.2e}"
            stats_diff = f"{max_difference(result.running_stats, reference.running_stats):.2e}"
        lines.append(f"| {names[run]} | {final:.4f} | {100 * result.test_accuracy:.1f}% | {loss_diff} | {stats_diff} |")
    return "\n".join(lines)


def plot(results: dict[str, RunResult], world: int, args: argparse.Namespace, path: Path) -> None:
    """The loss curves (and a moving average, to see through the noise of small batches) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"local": dict(color="tab:red", lw=1.2), "single": dict(color="black", lw=3.0, alpha=0.35),
              "syncnorm": dict(color="tab:blue", lw=1.0, ls="--")}
    labels = {"local": f"local BatchNorm ({world} ranks x {args.batch_per_rank})",
              "syncnorm": f"syncnorm ({world} ranks x {args.batch_per_rank})",
              "single": f"single process (batch {world * args.batch_per_rank})"}
    window = max(1, min(25, args.steps // 10))
    fig, (raw, smooth) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run in ("single", "local", "syncnorm"):  # syncnorm last: dashed, on top of the single process
        if run not in results:
            continue
        losses = torch.tensor(results[run].losses)
        steps = torch.arange(1, len(losses) + 1)
        raw.plot(steps, losses, label=labels[run], **styles[run])  # type: ignore[arg-type]
        if len(losses) >= window:
            averaged = losses.unfold(0, window, 1).mean(dim=1)
            smooth.plot(steps[window - 1:], averaged, label=labels[run], **styles[run])  # type: ignore[arg-type]
    raw.set_title("train loss of every global batch")
    smooth.set_title(f"moving average over {window} steps")
    for axes in (raw, smooth):
        axes.set_xlabel("step")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
    raw.set_ylabel("cross-entropy")
    smooth.legend()
    fig.suptitle("scikit-learn digits: syncnorm on W ranks follows the single process; local BatchNorm does not")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# scikit-learn's digits: 1797 images, 80 % of them to train (load_digits' split). Argument checks use the count
# before any data is loaded, so that a bad --batch-per-rank fails at once on every rank instead of hanging.
DIGITS_IMAGES = 1797
TRAIN_IMAGES = int(0.8 * DIGITS_IMAGES)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its message: "invalid positive integer value"


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


positive_float.__name__ = "positive number"


def launched_world_size() -> int:
    """The number of ranks a launcher asked for (WORLD_SIZE, set by torchrun and mpi_rendezvous), 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error; every rank prints it and exits with 2.

    Every rank, not only the first of a node: a launcher stops the other ranks as soon as one exits, so a
    message left to one rank could be lost.
    """

    def __init__(self, *args: Any, local_rank: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (--help lists the options)\n")
        sys.exit(2)


def parse_args(argv: Optional[list[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and check the arguments; a bad one ends in argparse's usage error (exit status 2).

    Every rank calls this before any process-group work, so every rank stops, none waits for the others.
    ``world_size`` defaults to the launcher's ``WORLD_SIZE``: the global batch must fit in the training images.
    """
    world = launched_world_size() if world_size is None else world_size
    parser = ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps of each run (default 300)")
    parser.add_argument("--batch-per-rank", type=positive_int, default=4,
                        help=f"images a rank sees each step (default 4); ranks x this must be at most the "
                        f"{TRAIN_IMAGES} training images")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="float64 (default) keeps float rounding, which SGD amplifies over hundreds of steps, "
                        "far below what the table shows; with float32 syncnorm and the single process drift "
                        "apart after tens to hundreds of steps like any two float32 runs summing in another order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the data order")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help="folder for train_digits.png and the per-rank results train_digits_rank<r>.pt")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (and the matplotlib import)")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.runs = [run.strip() for run in args.runs.split(",") if run.strip()]
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown or not args.runs:
        got = ", ".join(repr(run) for run in unknown) if unknown else "no name"
        parser.error(f"--runs expected a comma-separated subset of {','.join(RUNS)}, got {got}")
    if world * args.batch_per_rank > TRAIN_IMAGES:
        parser.error(f"--batch-per-rank {args.batch_per_rank} on {world} rank(s) asks for a global batch of "
                     f"{world * args.batch_per_rank} images, but the digits have {TRAIN_IMAGES} to train on; "
                     f"use --batch-per-rank {TRAIN_IMAGES // world} or less")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, backend = pick_device()
    if "WORLD_SIZE" in os.environ:  # started by torchrun, launch/torchrun.sh, launch/mpirun.sh or accelerate
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    else:
        # One rank on its own: a 1-rank group, so the script runs the same code (syncnorm is plain BatchNorm here).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"train_digits: {world} rank(s) on {device.type} with {backend}, "
              f"{args.batch_per_rank} images a rank, global batch {world * args.batch_per_rank}", flush=True)
        if world == 1:
            print("train_digits: one rank, so the three runs are the same model; start it with "
                  "launch/torchrun.sh --nproc 4 examples/train_digits.py to compare them", flush=True)

    data = load_digits(device, args.dtype)
    batches = global_batches(len(data.train_y), world * args.batch_per_rank, args.steps, args.seed)
    results: dict[str, RunResult] = {}
    for run in [r for r in RUNS if r in args.runs and r != "single"]:
        results[run] = train(run, data, batches, args, device, show_progress=rank == 0)
    if rank == 0 and "single" in args.runs:
        results["single"] = train("single", data, batches, args, device, show_progress=True)

    # Every rank writes what it trained, so tests can check that the ranks (or nodes) agree.
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"rank": rank, "world_size": world, "backend": backend, "device": device.type,
                "runs": {run: {"losses": r.losses, "state_dict": r.state_dict, "test_accuracy": r.test_accuracy}
                         for run, r in results.items()}},
               args.out / f"train_digits_rank{rank}.pt")
    if rank == 0:
        print()
        print(report(results, world, args), flush=True)
        if not args.no_plot:
            path = args.out / "train_digits.png"
            plot(results, world, args, path)
            print(f"\nloss curves saved to {path}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
