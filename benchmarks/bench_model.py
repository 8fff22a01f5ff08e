"""Model benchmark: a training step of a small ResNet-style conv net under DDP on CPU Gloo ranks.

Variants (same initial weights, timed interleaved step by step so background load hits all alike):
- local BatchNorm (``nn.BatchNorm2d``), and the same again as an A/A control for noise;
- syncnorm on the default (world) group;
- syncnorm on a dedicated statistics group (same ranks, a second communicator), so the
  BatchNorm all-reduces do not queue behind DDP's gradient buckets;
- optionally (``--compile``) the local and syncnorm models under ``torch.compile`` (``--backend``,
  inductor by default): the syncnorm layers trace whole there, their all-reduces inside the graph,
  and DDP's DDPOptimizer splits the graph at gradient buckets (``--optimize-ddp no_optimization``:
  one graph, DDP's reducer as in eager). ``--compile-only`` keeps just the rows the torch.compile
  comparison needs (compiled local BatchNorm, compiled syncnorm, eager syncnorm, the eager local
  baseline) and, with ``--compile``, the communication floor: local BatchNorm followed at every layer
  by syncnorm's two all-reduces of the same sizes and nothing else (eager), so that compiled
  syncnorm's cost over compiled local BatchNorm can be set beside what its collectives alone cost;
- ``--no-ddp``: the same models without the DDP wrapper (the layers still synchronise; parameter
  gradients are not averaged), to see torch.compile without DDP's graph splitting and hooks.

A step is forward + cross-entropy + backward (DDP all-reduces gradients) + SGD step. The table
shows the slowest rank's median step time (wall, and CPU time of all the rank's threads, which
leaves out waiting and so is robust to other load) and its ratio to local BatchNorm in the same run.

Run:
    PYTHONPATH=. python benchmarks/bench_model.py --world-size 2 --steps 20
    PYTHONPATH=. python benchmarks/bench_model.py --compile --compile-only --steps 20   # torch.compile rows
    PYTHONPATH=. python benchmarks/bench_model.py --compile --compile-only --steps 20 --no-ddp

Timing is never asserted anywhere; this only prints.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_layer import BareAllReduces, join_gloo_world, time_interleaved
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import syncnorm


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU: a ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(num_classes: int = 10, width: int = 32) -> nn.Module:
    """Stem + 4 basic blocks (13 BatchNorm layers), CIFAR-sized."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1),
        Block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
    )


COMM_FLOOR = "local BatchNorm + syncnorm's all-reduces (comm floor)"


def with_bare_all_reduces(model: nn.Module) -> nn.Module:
    """``model`` with syncnorm's two collectives (bench_layer.BareAllReduces) after every local BatchNorm layer."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Sequential(child, BareAllReduces(child.num_features)))
        else:
            with_bare_all_reduces(child)
    return model


def build_variants(base: nn.Module, compile_too: bool, backend: str = "inductor",
                   compile_only: bool = False, ddp: bool = True) -> dict[str, nn.Module]:
    """Every variant as a DDP model (``ddp``; else bare) with the same initial weights as ``base``."""
    dedicated = dist.new_group(list(range(dist.get_world_size())))  # created once, same ranks
    plain: dict[str, Callable[[], nn.Module]] = {
        "local BatchNorm": lambda: copy.deepcopy(base),
        "local BatchNorm (A/A)": lambda: copy.deepcopy(base),
        "syncnorm": lambda: syncnorm.convert_model(copy.deepcopy(base)),
        "syncnorm, dedicated stats group": lambda: syncnorm.convert_model(copy.deepcopy(base), dedicated),
        COMM_FLOOR: lambda: with_bare_all_reduces(copy.deepcopy(base)),
    }
    if compile_only:
        plain = {name: plain[name] for name in ("local BatchNorm", "syncnorm", COMM_FLOOR)}
    elif not compile_too:
        del plain[COMM_FLOOR]

    def wrap(model: nn.Module) -> nn.Module:
        return DistributedDataParallel(model) if ddp else model

    models: dict[str, nn.Module] = {name: wrap(make()) for name, make in plain.items()}
    if compile_too:
        models["local BatchNorm, compiled"] = torch.compile(  # type: ignore[assignment]
            wrap(copy.deepcopy(base)), backend=backend)
        models["syncnorm, compiled"] = torch.compile(  # type: ignore[assignment]
            wrap(syncnorm.convert_model(copy.deepcopy(base))), backend=backend)
    return models


def time_step(
    models: dict[str, nn.Module], x: Tensor, target: Tensor, warmup: int, steps: int
) -> dict[str, tuple[float, float]]:
    """This rank's median (wall ms, CPU ms of all its threads) of a training step per variant, interleaved."""
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in models.items()}

    def run_step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(models[name](x), target).backward()
        optimizers[name].step()

    return time_interleaved(list(models), run_step, warmup, steps)


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    join_gloo_world(rank, world, port, timeout_s=300)
    if args.compile:
        torch._dynamo.config.optimize_ddp = args.optimize_ddp
    torch.manual_seed(0)
    base = small_resnet(width=args.width)
    models = build_variants(base, args.compile, args.backend, args.compile_only, not args.no_ddp)
    torch.manual_seed(1 + rank)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))
    mine = time_step(models, x, target, args.warmup, args.steps)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        out.put({name: (max(r[name][0] for r in everyone), max(r[name][1] for r in everyone)) for name in mine})
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="samples per rank")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models (slow to build)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--compile-only", action="store_true",
                        help="with --compile: only local BatchNorm, syncnorm and their compiled rows")
    parser.add_argument("--optimize-ddp", default="ddp_optimizer", choices=["ddp_optimizer", "no_optimization"],
                        help="torch._dynamo.config.optimize_ddp of the compiled rows: split the graph at DDP's "
                             "buckets (torch's default), or compile whole and let DDP's reducer run as in eager")
    parser.add_argument("--no-ddp", action="store_true",
                        help="models without the DDP wrapper (parameter gradients not averaged; the layers still sync)")
    parser.add_argument("--timeout", type=float, default=1200.0)
    args = parser.parse_args(argv)

    context = mp.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_rank_main, args=(r, args.world_size, port, args, out))
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    try:
        rows: dict[str, tuple[float, float]] = out.get(timeout=args.timeout)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average after {os.getloadavg()[0]:.1f}; "
          f"W={args.world_size} Gloo ranks, 1 thread each, "
          f"{'no DDP' if args.no_ddp else 'DDP'}; "
          f"small ResNet (width {args.width}, 13 BN layers), batch {args.batch}x3x{args.size}x{args.size} "
          f"per rank; {args.warmup} warm-up + {args.steps} timed steps, variants interleaved")
    print("| variant | wall ms / step (slowest rank's median) | ratio | CPU ms / step (rank's threads) | ratio |")
    print("|---|---|---|---|---|")
    base_wall, base_cpu = rows["local BatchNorm"]
    for name, (ms, cpu_ms) in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / base_wall:.2f}x | {cpu_ms:.1f} | {cpu_ms / base_cpu:.2f}x |")
    if args.compile:
        compiled_cpu = rows["syncnorm, compiled"][1]
        compiled_local_cpu = rows["local BatchNorm, compiled"][1]
        comm_cpu = rows[COMM_FLOOR][1] - base_cpu
        print(f"CPU time (backend {args.backend}, optimize_ddp={args.optimize_ddp}): compiled syncnorm / compiled "
              f"local BatchNorm = {compiled_cpu / compiled_local_cpu:.2f}x; compiled syncnorm / eager syncnorm = "
              f"{compiled_cpu / rows['syncnorm'][1]:.2f}x; compiled syncnorm - compiled local BatchNorm = "
              f"{compiled_cpu - compiled_local_cpu:.1f} ms, of which syncnorm's all-reduces alone (comm floor - "
              f"local BatchNorm) {comm_cpu:.1f} ms")


if __name__ == "__main__":
    main()
