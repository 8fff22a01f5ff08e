"""A training step with syncnorm layers captured in a CUDA graph replays exactly as the eager steps do.

GPU-only (skipped with "needs CUDA" elsewhere; the CPU-side guarantee, zero host syncs in a step, is
tests/test_op_counts.py's). The step is forward, cross-entropy, backward and an SGD step of a small conv
net (``convert_model`` of Conv-BN-ReLU x2 + Linear-BatchNorm1d), captured with ``torch.cuda.graph`` after
warm-up steps on a side stream, then replayed on new data copied into the static input. The oracle is a
twin model trained eagerly on the same data: parameters, ``running_mean``, ``running_var`` and
``num_batches_tracked`` after every replayed step.

- **1-rank NCCL group, collectives issued.** syncnorm skips communication in a group of one rank, so the
  tests make the layers take their synchronised path anyway (``syncnorm._comm.statistics_group`` returns
  the world group of one rank), as ``benchmarks/check_cuda.py`` does by calling the Function directly:
  the eager step is counted to make 2 all-reduces a layer, and the captured graph records them.
- **Several ranks over Gloo (CUDA tensors, ranks sharing GPU 0).** Gloo runs a CUDA all-reduce on the host
  (device-to-host copy, CPU reduction, copy back), which a CUDA graph cannot record. The test accepts
  exactly two outcomes: capture raises (as the torch.compile and CUDA graphs guide says), or the replay equals eager,
  rank 1 holding NO samples included. A replay that silently differs fails it. (torch.nn.SyncBatchNorm
  is not exact for empty ranks while capturing, pytorch#78656; on several GPUs with NCCL, syncnorm must be.)
- **A rank holding <= 1 value per channel.** In eager mode such a rank reads the global count on the host,
  to raise torch's "Expected more than 1 value per channel when training" for a global count of 1, or to
  leave the running statistics alone for an all-empty global batch. While a CUDA graph is captured it
  reads nothing: the running statistics are guarded on the device (an empty global batch keeps
  them) and a count of 1 fails a device-side assertion. The test below captures an empty global batch
  for real; tests/test_capture_branch.py forces the branch on CPU ranks (uneven and empty ranks, zero
  host syncs, the float64 reference).
"""

from __future__ import annotations

import copy
import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from reference import TOLERANCES
from torch import nn

import syncnorm
from syncnorm import _comm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

STEPS = 3
WARMUP = 3
CLASSES = 4


def small_net() -> nn.Module:
    """Conv-BN-ReLU x2, pooling, Linear and BatchNorm1d: three BatchNorm layers."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES), nn.BatchNorm1d(CLASSES),
    )


def batches(n: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``n`` images with labels, on the GPU."""
    generator = torch.Generator().manual_seed(seed)
    return [((torch.randn(n, 3, 8, 8, generator=generator) * 2 + 1).cuda(),
             torch.randint(0, CLASSES, (n,), generator=generator).cuda()) for _ in range(count)]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
               global_n: int) -> torch.Tensor:
    """Forward, loss (the mean over the GLOBAL batch: this rank's share), backward, SGD step."""
    optimizer.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), target, reduction="sum") / global_n
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_twins(device: torch.device, fused_activation: bool = False) -> tuple[nn.Module, nn.Module]:
    """The same converted model twice (same initial weights): one to capture, one to run eagerly.

    ``fused_activation``: the ReLUs are leaky and fused into ``syncnorm.SyncBatchNormAct`` layers, which keep
    their whole input while a graph is captured and choose the channels to keep (a host read) in eager steps.
    """
    torch.manual_seed(0)
    net = small_net()
    if fused_activation:
        net = nn.Sequential(*(nn.LeakyReLU(0.1) if isinstance(m, nn.ReLU) else m for m in net))
    model = syncnorm.convert_model(net, fuse_activation=fused_activation).to(device)
    if fused_activation:
        assert sum(isinstance(m, syncnorm.SyncBatchNormAct) for m in model.modules()) == 2
    return model, copy.deepcopy(model)


def assert_same_state(graphed: nn.Module, eager: nn.Module, what: str) -> None:
    """Parameters and every buffer (running statistics, num_batches_tracked) of the two models."""
    eager_state = eager.state_dict()
    for name, value in graphed.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, eager_state[name], **TOLERANCES[torch.float32],
                                       msg=lambda m, name=name: f"{what}, {name}: {m}")
        else:
            assert torch.equal(value, eager_state[name]), f"{what}, {name}: {value} != {eager_state[name]}"


def capture_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: list[tuple[torch.Tensor, torch.Tensor]],
                 global_n: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """Warm up on a side stream (as torch's docs require), then capture one step; returns graph and inputs."""
    static_x, static_target = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, target in data[:WARMUP]:
            static_x.copy_(x)
            static_target.copy_(target)
            train_step(model, optimizer, static_x, static_target, global_n)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, optimizer, static_x, static_target, global_n)
    return graph, static_x, static_target


def replay_and_compare(graph: torch.cuda.CUDAGraph, static_x: torch.Tensor, static_target: torch.Tensor,
                       graphed: nn.Module, eager: nn.Module, eager_optimizer: torch.optim.Optimizer,
                       data: list[tuple[torch.Tensor, torch.Tensor]], global_n: int) -> None:
    """The eager twin does the warm-up steps, then each replay is checked against one eager step."""
    for x, target in data[:WARMUP]:
        train_step(eager, eager_optimizer, x, target, global_n)
    assert_same_state(graphed, eager, "after warm-up")
    for step, (x, target) in enumerate(data[WARMUP:]):
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        train_step(eager, eager_optimizer, x, target, global_n)
        torch.cuda.synchronize()
        assert_same_state(graphed, eager, f"replay {step}")


# --- one rank, NCCL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nccl_group() -> Iterator[dist.ProcessGroup]:
    """A 1-rank NCCL group on GPU 0, formed here unless the process already has one."""
    if dist.is_initialized():
        if dist.get_backend() != "nccl":
            pytest.skip("this process already has a non-NCCL default group")
        yield dist.group.WORLD
        return
    torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda", 0))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def issuing(monkeypatch: pytest.MonkeyPatch, nccl_group: dist.ProcessGroup) -> list[str]:
    """Layers synchronise over the 1-rank group (really issuing their all-reduces); returns a call log."""
    monkeypatch.setattr(_comm, "statistics_group", lambda process_group, layer: nccl_group)
    calls: list[str] = []
    original = dist.all_reduce

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append("all_reduce")
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counted)
    return calls


@pytest.mark.parametrize("fused_activation", [False, True], ids=["batchnorm", "batchnorm-act"])
def test_captured_training_step_replays_as_eager_with_a_1_rank_nccl_group(issuing: list[str],
                                                                          fused_activation: bool) -> None:
    device = torch.device("cuda", 0)
    graphed, eager = make_twins(device, fused_activation)
    n = 6
    data = batches(n, WARMUP + STEPS, seed=1)
    optimizer = torch.optim.SGD(graphed.parameters(), lr=0.1, momentum=0.9)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)

    probe = copy.deepcopy(graphed)
    layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in graphed.modules())
    # Every step, a fresh layer's first included: one forward all-reduce a layer (float32 input) and one backward.
    for step in range(2):
        issuing.clear()
        train_step(probe, torch.optim.SGD(probe.parameters(), lr=0.0), *data[step], n)
        assert issuing.count("all_reduce") == 2 * layers, f"eager step {step} issued {issuing} for {layers} layers"

    issuing.clear()
    graph, static_x, static_target = capture_step(graphed, optimizer, data, n)
    # The warm-up steps and the captured one: the same two a layer each (the graph records the captured ones).
    assert issuing.count("all_reduce") == 2 * layers * (WARMUP + 1), f"{issuing} for {layers} layers"
    replay_and_compare(graph, static_x, static_target, graphed, eager, eager_optimizer, data, n)
    assert int(graphed[1].num_batches_tracked) == WARMUP + STEPS


def test_make_graphed_callables_forward_backward_equals_eager(issuing: list[str]) -> None:
    """The module form: forward and backward graphed (the optimizer step stays eager)."""
    device = torch.device("cuda", 0)
    graphed, eager = make_twins(device)
    n = 6
    data = batches(n, 1 + STEPS, seed=2)
    callable_ = torch.cuda.make_graphed_callables(graphed, (data[0][0].clone(),), num_warmup_iters=3)
    # make_graphed_callables' warm-up ran 3 training forwards: the eager twin does the same.
    for _ in range(3):
        F.cross_entropy(eager(data[0][0]), data[0][1]).backward()
    for p in list(graphed.parameters()) + list(eager.parameters()):
        p.grad = None
    for step, (x, target) in enumerate(data[1:]):
        F.cross_entropy(callable_(x), target).backward()
        F.cross_entropy(eager(x), target).backward()
        torch.cuda.synchronize()
        assert_same_state(graphed, eager, f"graphed call {step}")
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOLERANCES[torch.float32],
                                       msg=lambda m, name=name, step=step: f"call {step}, {name}.grad: {m}")


def test_a_global_count_of_one_raises_eagerly(issuing: list[str]) -> None:
    """Eager mode reads the count on the host and raises torch's error (in a capture: a device-side assert)."""
    layer = syncnorm.SyncBatchNorm(4, device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 4, device="cuda"))


def test_captured_empty_global_batch_keeps_the_running_statistics(issuing: list[str]) -> None:
    """An empty rank (here: an empty global batch) is captured without a host read and replays exactly."""
    device = torch.device("cuda", 0)
    torch.manual_seed(3)
    graphed = syncnorm.SyncBatchNorm(4, device=device)
    eager = copy.deepcopy(graphed)
    full = torch.randn(6, 4, device=device) * 2 + 1
    empty = torch.empty(0, 4, device=device, requires_grad=True)
    for layer in (graphed, eager):  # running statistics worth keeping
        layer(full).sum().backward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed(empty).sum().backward()  # warm-up on a side stream, as torch's docs require
    torch.cuda.current_stream().wait_stream(side)
    eager(empty).sum().backward()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed(empty).sum().backward()
    for step in range(STEPS):
        graph.replay()
        eager(empty).sum().backward()
        torch.cuda.synchronize()
        assert_same_state(graphed, eager, f"replay {step}")
    assert torch.isfinite(graphed.running_var).all()


# --- several ranks, CUDA tensors over Gloo -----------------------------------------------------------------

GLOO_SIZES = [5, 0]  # rank 1 holds no samples


def _gloo_rank(rank: int, world: int, port: int, results: Any) -> None:
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        device = torch.device("cuda", 0)
        global_n = sum(GLOO_SIZES)
        graphed, eager = make_twins(device)
        data = [(x[: GLOO_SIZES[rank]], t[: GLOO_SIZES[rank]]) for x, t in batches(global_n, WARMUP + STEPS,
                                                                                       seed=10 + rank)]
        optimizer = torch.optim.SGD(graphed.parameters(), lr=0.1)
        eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
        try:
            graph, static_x, static_target = capture_step(graphed, optimizer, data, global_n)
        except Exception as error:  # noqa: BLE001 - the documented outcome; reported to the test
            results.put((rank, "refused", f"{type(error).__name__}: {str(error).splitlines()[0]}"))
            return
        replay_and_compare(graph, static_x, static_target, graphed, eager, eager_optimizer, data, global_n)
        results.put((rank, "exact", ""))
    except Exception:  # noqa: BLE001
        results.put((rank, "error", traceback.format_exc()))
    finally:
        os._exit(0)  # a failed capture can leave a Gloo peer waiting: do not wait for destroy_process_group


def test_captured_step_over_gloo_with_an_empty_rank_is_exact_or_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    world = len(GLOO_SIZES)
    processes = [context.Process(target=_gloo_rank, args=(r, world, port, results)) for r in range(world)]
    for p in processes:
        p.start()
    outcomes: dict[int, tuple[str, str]] = {}
    try:
        for _ in range(world):
            rank, outcome, detail = results.get(timeout=150)
            outcomes[rank] = (outcome, detail)
    except queue.Empty:
        pass
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = {r: d for r, (o, d) in outcomes.items() if o == "error"}
    assert not errors, "\n".join(f"rank {r}:\n{d}" for r, d in errors.items())
    kinds = {o for o, _ in outcomes.values()}
    if "refused" in kinds:
        # The documented limit: Gloo's host-side CUDA all-reduce cannot be recorded in a graph.
        pytest.xfail("capture over Gloo refused: " + "; ".join(f"rank {r}: {d}" for r, (o, d) in outcomes.items()))
    assert outcomes and kinds == {"exact"} and len(outcomes) == world, outcomes
