"""torch.compile(fullgraph=True) through syncnorm layers: one graph, collectives inside it, eager-exact results.

Every multi-rank case trains a float64 model for two steps on W=2 Gloo ranks with uneven batches,
compiled with ``fullgraph=True`` and eagerly from the same initial state, then runs one eval-mode
forward. A layer keeps nothing between steps, so every step, eager or compiled, first or later, takes
the same collectives. Compiled and eager agree to 1e-9 (output, input gradient, parameter gradients, running
statistics, ``num_batches_tracked``), and both agree with the oracle: torch's own float64 BatchNorm
in one process on the concatenated batch.

Most cases compile with an AOTAutograd backend that keeps the FX forward and backward graphs and
runs them as they are (what ``aot_eager`` does), so the test can count the all-reduces inside them:
two per layer in the forward graph for float64 input (``(n, sum x)`` for the global mean, C+1 values,
then the sums about it, 2C+1 values; float32 input takes the second only), one per layer in the
backward graph (2C values), the sizes the eager layers send. One case compiles with inductor (C++ code
generation, slow on 2 cores, hence a single small model), one runs the ``fused`` kernels
(tests/fused_cpu.py's CPU stand-ins).

Kept cheap (compilation dominates): one "mixed" model covers every layer kind users compile in one
compilation; the other cases use a one-layer model; subsets run on W=2 (a group of one and a new
two-rank group in one model) instead of W=4.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncnorm
from tests.distributed import COLLECTIVES, my_slice, run_on_ranks, use_kernels

SIZES = [3, 5]
STEPS = 2
EXACT = dict(rtol=1e-9, atol=1e-9)  # compiled vs eager, and vs the float64 oracle (float64 data)
COMPILE_TIMEOUT_S = 600.0


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (like timm's BatchNormAct2d): convert_model gives it a
    generated ``SyncBatchNormAct`` whose F.batch_norm call a TorchFunctionMode routes to syncnorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x)) * 1.5


class Checkpointed(nn.Module):
    """conv-BN-ReLU under non-reentrant activation checkpointing (recomputed in backward)."""

    def __init__(self, norm: nn.Module, checkpointed: bool) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm, nn.ReLU())
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checkpointed:
            return self.inner(x)
        out: torch.Tensor = torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)
        return out


class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


# The layers of the "mixed" model: (description, channels). One compile covers every kind of layer.
MIXED_LAYERS = [("BatchNorm2d under activation checkpointing", 6), ("BatchNorm subclass -> SyncBatchNormAct", 5),
                ("timm BatchNormAct2d -> SyncBatchNormAct2d", 7), ("built as syncnorm.SyncBatchNorm, momentum=None", 8),
                ("BatchNorm2d on channels_last input", 4)]


def _model(kind: str, synced: bool) -> nn.Module:
    """The case's float64 model; ``synced``: as the ranks run it, else as the one-process oracle runs it.

    "small": conv-BN2d through convert_model. "mixed": every layer kind users compile
    in one model (one compilation instead of five): a checkpointed BatchNorm2d, a user BatchNorm subclass
    and timm's BatchNormAct2d (generated Sync<Name> classes), a layer built as syncnorm.SyncBatchNorm with
    momentum=None, and channels_last activations from the second layer on.
    """
    torch.manual_seed(0)
    if kind == "small":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    else:
        from timm.layers import BatchNormAct2d

        built: Callable[..., nn.Module] = syncnorm.SyncBatchNorm if synced else nn.BatchNorm2d
        model = nn.Sequential(
            # The oracle runs without checkpointing: torch's own BatchNorm counts a recomputed batch twice.
            Checkpointed(nn.BatchNorm2d(6), checkpointed=synced),
            ToChannelsLast(),
            nn.Conv2d(6, 5, 3, padding=1), BatchNormAct(5),
            nn.Conv2d(5, 7, 3, padding=1), BatchNormAct2d(7),
            nn.Conv2d(7, 8, 1), built(8, momentum=None), nn.ReLU(),
            nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4),
        )
    model = model.double()
    return syncnorm.convert_model(model) if synced else model


def inspecting_backend(log: dict[str, list[Any]]) -> Any:
    """An AOTAutograd backend that records, per compiled FX graph, its all-reduces (elements, group name)
    and (under "ops") the names of its ops, then runs the graph unchanged (as aot_eager does)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def compiler(which: str) -> Callable[..., Any]:
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            log[which].append([
                (node.args[0].meta["val"].numel(), node.args[2]) for node in gm.graph.nodes
                if node.target is torch.ops._c10d_functional.all_reduce.default
            ])
            ops = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
            log.setdefault("ops", []).append(ops)
            return make_boxed_func(gm.forward)

        return compile_graph

    # The min-cut partitioner, as aot_eager and inductor use: the default partitioner of a bare aot_autograd
    # backend copies a dead forward all-reduce of the float64 two-pass merge into the backward graph (it keeps
    # collectives when it extracts the backward; the min-cut partitioner force-saves them and drops dead ones).
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        partition_fn=min_cut_rematerialization_partition)


def _train(model: nn.Module, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, kind: str,
           autocast: bool = False) -> dict[str, Any]:
    """STEPS training steps then one eval forward; what each produced, and the eager collectives of step 0."""
    steps, eager_collectives = [], {}
    for step in range(STEPS):
        inp = my_slice(x[step], SIZES).requires_grad_()
        module.zero_grad(set_to_none=True)
        COLLECTIVES.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(inp)
        forward_calls = list(COLLECTIVES.calls)
        COLLECTIVES.reset()
        upstream = my_slice(dy[step], SIZES)
        (y.to(upstream.dtype) * upstream).sum().backward()
        if step == 0:
            eager_collectives = {"forward": forward_calls, "backward": list(COLLECTIVES.calls)}
        steps.append({"y": y.detach(), "grad_x": inp.grad,
                      "grads": {n: _full(p.grad).clone() for n, p in module.named_parameters()}})
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    module.eval()
    with torch.no_grad():
        eval_y = model(my_slice(x[0], SIZES))
    module.train()
    return {"steps": steps, "buffers": buffers, "eval": eval_y, "collectives": eager_collectives}


def _full(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as a plain tensor: the whole of it, gathered from the ranks' shards under fully_shard."""
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def rank_fullgraph_and_eager(kind: str, backend: str, x: torch.Tensor, dy: torch.Tensor,
                             kernels: str | None = None) -> dict[str, Any]:
    """On one rank: the case's model trained compiled (fullgraph=True) and eagerly, from the same state."""
    with use_kernels(kernels):
        return _fullgraph_and_eager(kind, backend, x, dy)


def _fullgraph_and_eager(kind: str, backend: str, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_module = _model(kind, synced=True)
    eager_module = copy.deepcopy(compiled_module)
    graphs: dict[str, list[Any]] = {"forward": [], "backward": []}
    chosen = inspecting_backend(graphs) if backend == "inspect" else backend
    compiled = torch.compile(compiled_module, backend=chosen, fullgraph=True)
    report = {
        "compiled": _train(compiled, compiled_module, x, dy, kind),
        "eager": _train(eager_module, eager_module, x, dy, kind),
        "graphs": graphs,
        "unique_graphs": counters["stats"]["unique_graphs"],
        "group_name": torch.distributed.group.WORLD.group_name,
        "classes": sorted({type(m).__name__ for m in compiled_module.modules()}),
    }
    torch._dynamo.reset()
    return report


def _reference(kind: str, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """The same steps in float64, one process, torch's own BatchNorm, on the whole batch."""
    model = _model(kind, synced=False)
    steps = []
    for step in range(STEPS):
        inp = x[step].requires_grad_()
        model.zero_grad(set_to_none=True)
        y = model(inp)
        (y * dy[step]).sum().backward()
        steps.append({"y": y.detach(), "grad_x": inp.grad,
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        eval_y = model.eval()(x[0])
    return {"steps": steps, "buffers": buffers, "eval": eval_y}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, sum(SIZES), 3, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1
    dy = torch.randn(STEPS, sum(SIZES), 4, 4, 4, generator=generator, dtype=torch.float64)
    return x, dy


def _close(actual: Any, expected: Any, what: str) -> None:
    torch.testing.assert_close(actual, expected, **EXACT, msg=lambda m: f"{what}: {m}")


def _check_against_eager_and_reference(reports: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Compiled == eager (1e-9) on every rank, and both == the one-process float64 oracle."""
    for step in range(STEPS):
        for key in ("y", "grad_x"):
            for variant in ("compiled", "eager"):
                ours = torch.cat([r[variant]["steps"][step][key] for r in reports])
                _close(ours, reference["steps"][step][key], f"{variant} step {step} {key}")
        for name, expected in reference["steps"][step]["grads"].items():
            for variant in ("compiled", "eager"):
                # Each rank holds its share of a parameter gradient; the shares sum to the oracle's.
                ours = sum(r[variant]["steps"][step]["grads"][name] for r in reports)
                _close(ours, expected, f"{variant} step {step} grad of {name}")
    for r in reports:
        for name, expected in reference["buffers"].items():
            for variant in ("compiled", "eager"):
                ours = r[variant]["buffers"][name]
                assert ours.dtype == expected.dtype, name
                _close(ours, expected, f"{variant} buffer {name}")
    for variant in ("compiled", "eager"):
        torch.testing.assert_close(torch.cat([r[variant]["eval"] for r in reports]), reference["eval"], **EXACT)
    for r in reports:  # and compiled vs eager directly, rank by rank
        torch.testing.assert_close(r["compiled"]["steps"], r["eager"]["steps"], **EXACT)
        torch.testing.assert_close(r["compiled"]["buffers"], r["eager"]["buffers"], **EXACT)


def float64_merge(channels: int) -> list[int]:
    """The sizes of a layer's forward all-reduces for float64 input: ``(n, sum x)``, then the sums about the mean."""
    return [channels + 1, 2 * channels + 1]


def _check_graph_collectives(report: dict[str, Any], channels: list[int], recomputed: int = 0) -> None:
    """The all-reduces of the graphs and of eager step 0, the same: a layer keeps nothing between steps.

    Forward (float64 input): two all-reduces per layer, C+1 values for the global mean, then 2C+1 about
    it, eager and compiled, at every step. Backward: one of 2C per layer. ``recomputed``: the first
    layers are checkpointed; their forward runs again inside backward, with the forward's two all-reduces.
    """
    group = report["group_name"]
    eager = report["eager"]["collectives"]
    forward = [n for c in channels for n in float64_merge(c)]
    backward_sizes = [2 * c for c in channels] + [n for c in channels[:recomputed] for n in float64_merge(c)]
    assert [(name, numel) for name, numel, _ in eager["forward"]] == [("all_reduce", n) for n in forward]
    assert sorted((name, numel) for name, numel, _ in eager["backward"]) == sorted(
        ("all_reduce", n) for n in backward_sizes)
    # Two forward graphs: training, then eval (a recompile on the training flag); one backward graph.
    train_forward, eval_forward = report["graphs"]["forward"]
    (backward,) = report["graphs"]["backward"]
    assert train_forward == [(n, group) for n in forward]
    # A checkpointed layer's recomputed forward syncs again inside the compiled backward too, as in eager.
    assert sorted(backward) == sorted((n, group) for n in backward_sizes), backward
    assert eval_forward == []  # eval mode never communicates
    # The compiled steps issued no eager collective: every one of them is in the graphs.
    assert report["compiled"]["collectives"] == {"forward": [], "backward": []}


def test_fullgraph_trains_like_eager_and_like_one_process() -> None:
    """The mixed model: converted and built layers, subclasses, checkpointing, momentum=None, channels_last."""
    x, dy = _data()
    reports = run_on_ranks(2, rank_fullgraph_and_eager, "mixed", "inspect", x, dy, timeout=COMPILE_TIMEOUT_S)
    _check_against_eager_and_reference(reports, _reference("mixed", x, dy))
    for report in reports:
        assert {"SyncBatchNormAct", "SyncBatchNormAct2d", "SyncBatchNorm"} <= set(report["classes"])
        assert report["unique_graphs"] == 2  # train and eval: no graph break, no other recompile
        _check_graph_collectives(report, [c for _, c in MIXED_LAYERS], recomputed=1)


def test_fullgraph_inductor_trains_like_eager_and_like_one_process() -> None:
    x, dy = _data()
    reports = run_on_ranks(2, rank_fullgraph_and_eager, "small", "inductor", x, dy, timeout=COMPILE_TIMEOUT_S)
    _check_against_eager_and_reference(reports, _reference("small", x, dy))
    for report in reports:
        assert report["unique_graphs"] == 2


def test_fullgraph_fused_kernels_train_like_eager_and_like_one_process() -> None:
    """SYNCNORM_KERNELS=fused under compile: torch's fused SyncBatchNorm ops (CPU stand-ins) in the graphs."""
    x, dy = _data()
    reports = run_on_ranks(2, rank_fullgraph_and_eager, "small", "inspect", x, dy, "fused", timeout=COMPILE_TIMEOUT_S)
    _check_against_eager_and_reference(reports, _reference("small", x, dy))
    for report in reports:
        assert report["unique_graphs"] == 2
        _check_graph_collectives(report, [4])
        ops = report["graphs"]["ops"]
        assert any({"aten.batch_norm_stats.default", "aten.batch_norm_elemt.default"} <= g for g in ops), ops
        assert any({"aten.batch_norm_backward_reduce.default", "aten.batch_norm_backward_elemt.default"} <= g
                   for g in ops), ops


def _many_shapes_model() -> nn.Module:
    """Nine syncnorm layers of nine shapes: more than dynamo's recompile limit (8) if each shape recompiled."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = 4
    for _ in range(9):
        layers += [nn.Linear(width, width + 1), syncnorm.SyncBatchNorm(width + 1)]
        width += 1
    return nn.Sequential(*layers).double()


def rank_many_shapes(x: torch.Tensor) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs: dict[str, list[Any]] = {"forward": [], "backward": []}
    model = _many_shapes_model()
    compiled = torch.compile(model, backend=inspecting_backend(graphs), fullgraph=True)
    for step in range(STEPS):
        compiled(my_slice(x[step], SIZES)).square().sum().backward()
    report = {"unique_graphs": counters["stats"]["unique_graphs"], "graphs": graphs,
              "recompiles": dict(counters["recompiles"]), "graph_breaks": dict(counters["graph_break"])}
    torch._dynamo.reset()
    return report


def test_one_compilation_for_many_differently_shaped_layers() -> None:
    x = torch.randn(STEPS, sum(SIZES), 4, dtype=torch.float64)
    for report in run_on_ranks(2, rank_many_shapes, x, timeout=COMPILE_TIMEOUT_S):
        assert report["unique_graphs"] == 1
        assert report["recompiles"] == {} and report["graph_breaks"] == {}
        (forward,), (backward,) = report["graphs"]["forward"], report["graphs"]["backward"]
        assert [numel for numel, _ in forward] == [n for c in range(5, 14) for n in float64_merge(c)]
        assert sorted(numel for numel, _ in backward) == [2 * c for c in range(5, 14)]


def test_import_syncnorm_does_not_import_dynamo() -> None:
    code = "import sys, syncnorm; assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_eager_steps_do_not_import_dynamo() -> None:
    """An eager training and eval step (a layer with an activation too) never touch torch.compile's machinery."""
    code = ("import sys, torch, syncnorm; bn = syncnorm.SyncBatchNorm(3); bn(torch.randn(4, 3)).sum().backward(); "
            "bn.eval()(torch.randn(2, 3)); act = syncnorm.SyncBatchNormAct(3); "
            "act(torch.randn(4, 3)).sum().backward(); assert 'torch._dynamo' not in sys.modules, 'dynamo imported'")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def _subsets_model(alone: Any, pair: Any, synced: bool) -> nn.Sequential:
    """conv-BN-conv-BN: the first layer within a group of one rank, the second within a new two-rank group."""
    torch.manual_seed(0)
    norm: Callable[..., nn.Module] = syncnorm.SyncBatchNorm if synced else nn.BatchNorm2d
    extra = [{"process_group": alone}, {"process_group": pair}] if synced else [{}, {}]
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm(4, **extra[0]), nn.Conv2d(4, 4, 1), norm(4, **extra[1])).double()


def rank_subset_groups(x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """W=2: one layer in a group of one (new_sync_groups(1)), one in a new group of both ranks, compiled vs eager."""
    torch._dynamo.reset()
    alone = syncnorm.new_sync_groups(1)
    pair = syncnorm.new_sync_groups(2)  # both ranks, but not the default group: referred to by its own name
    # Built twice from the same seed: a module holding a ProcessGroup cannot be deep-copied.
    module, eager = _subsets_model(alone, pair, True), _subsets_model(alone, pair, True)
    graphs: dict[str, list[Any]] = {"forward": [], "backward": []}
    compiled = torch.compile(module, backend=inspecting_backend(graphs), fullgraph=True)
    rank = torch.distributed.get_rank()
    out = {}
    for name, model, mod in (("compiled", compiled, module), ("eager", eager, eager)):
        inp = x[rank].clone().requires_grad_()
        y = model(inp)
        (y * dy[rank]).sum().backward()
        out[name] = {"y": y.detach(), "grad_x": inp.grad, "buffers": [b.clone() for b in mod.buffers()]}
    torch._dynamo.reset()
    world = torch.distributed.group.WORLD
    return {**out, "graphs": graphs, "pair": pair.group_name, "world": None if world is None else world.group_name}


def test_fullgraph_within_process_group_subsets() -> None:
    x = torch.randn(2, 3, 3, 5, 5, dtype=torch.float64)
    dy = torch.randn(2, 3, 4, 3, 3, dtype=torch.float64)
    reports = run_on_ranks(2, rank_subset_groups, x, dy, timeout=COMPILE_TIMEOUT_S)
    # The oracle: the first BatchNorm on each rank's batch alone (a copy per rank), the second on both together.
    reference = _subsets_model(None, None, synced=False)
    firsts = [copy.deepcopy(reference[1]) for _ in range(2)]
    inp = x.flatten(0, 1).requires_grad_()
    hidden = torch.cat([bn(part) for bn, part in zip(firsts, reference[0](inp).split(3))])
    y = reference[3](reference[2](hidden))
    (y * dy.flatten(0, 1)).sum().backward()
    for r, report in enumerate(reports):
        expected_buffers = [*firsts[r].buffers(), *reference[3].buffers()]
        for variant in ("compiled", "eager"):
            torch.testing.assert_close(report[variant]["y"], y.detach().split(3)[r], **EXACT)
            torch.testing.assert_close(report[variant]["grad_x"], inp.grad.split(3)[r], **EXACT)
            for ours, expected in zip(report[variant]["buffers"], expected_buffers, strict=True):
                torch.testing.assert_close(ours, expected, **EXACT)
        # Only the second layer communicates, on its own group by name (not the default group's).
        assert report["pair"] != report["world"]
        assert report["graphs"]["forward"] == [[(n, report["pair"]) for n in float64_merge(4)]]
        assert report["graphs"]["backward"] == [[(8, report["pair"])]]


def rank_wrapped(x: torch.Tensor, dy: torch.Tensor, wrapper: str) -> dict[str, Any]:
    """A small converted model under ``wrapper``, compiled and eager, from the same state.

    ``"ddp"``: DistributedDataParallel (dynamo's DDPOptimizer splits the graph at buckets); ``"fully_shard"``:
    FSDP2 on a CPU mesh of every rank.
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_module = _model("small", synced=True)
    eager_module = copy.deepcopy(compiled_module)
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        compiled_model, eager_model = DistributedDataParallel(compiled_module), DistributedDataParallel(eager_module)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        compiled_model = fully_shard(compiled_module, mesh=mesh)
        eager_model = fully_shard(eager_module, mesh=mesh)
    graphs: dict[str, list[Any]] = {"forward": [], "backward": []}
    compiled = torch.compile(compiled_model, backend=inspecting_backend(graphs))
    report = {"compiled": _train(compiled, compiled_module, x, dy, "small"),
              "eager": _train(eager_model, eager_module, x, dy, "small"),
              "graphs": graphs, "graph_breaks": dict(counters["graph_break"]),
              "group_name": torch.distributed.group.WORLD.group_name,
              "classes": [type(compiled_model).__name__, type(eager_model).__name__]}
    torch._dynamo.reset()
    return report


def test_ddp_under_compile_trains_like_eager_ddp() -> None:
    x, dy = _data()
    reports = run_on_ranks(2, rank_wrapped, x, dy, "ddp", timeout=COMPILE_TIMEOUT_S)
    # DDP averages the parameter gradients: each of the W ranks holds sum/W, and their sum is still the oracle's.
    _check_against_eager_and_reference(reports, _reference("small", x, dy))
    for report in reports:
        group = report["group_name"]
        forwards = [c for graph in report["graphs"]["forward"] for c in graph]
        backwards = [c for graph in report["graphs"]["backward"] for c in graph]
        # Both layers' all-reduces are inside the compiled graphs (split by DDPOptimizer), training and eval.
        assert forwards == [(n, group) for n in float64_merge(4)]
        assert backwards == [(8, group)]
        assert not any("syncnorm" in reason for reason in report["graph_breaks"]), report["graph_breaks"]


def test_fully_shard_under_compile_trains_like_eager_fully_shard() -> None:
    x, dy = _data()
    reports = run_on_ranks(2, rank_wrapped, x, dy, "fully_shard", timeout=COMPILE_TIMEOUT_S)
    # FSDP averages the parameter gradients as DDP does: the ranks' full gradients sum to the oracle's.
    _check_against_eager_and_reference(reports, _reference("small", x, dy))
    for report in reports:
        group = report["group_name"]
        assert all(name.startswith("FSDP") for name in report["classes"]), report["classes"]  # fully_shard's class
        # dynamo skips FSDP2's hooks (torch._dynamo.config.skip_fsdp_hooks): they run eagerly, around the graphs,
        # which hold the syncnorm layer's all-reduces, training and eval, as without FSDP.
        assert [c for graph in report["graphs"]["forward"] for c in graph] == [(n, group) for n in float64_merge(4)]
        assert [c for graph in report["graphs"]["backward"] for c in graph] == [(8, group)]
        assert not any("syncnorm" in reason for reason in report["graph_breaks"]), report["graph_breaks"]


def rank_autocast(x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = syncnorm.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = {"compiled": _train(compiled, module, x.float(), dy.float(), "bf16", autocast=True),
           "eager": _train(eager, eager, x.float(), dy.float(), "bf16", autocast=True)}
    torch._dynamo.reset()
    return out


def test_fullgraph_bfloat16_autocast_matches_eager() -> None:
    x, dy = _data()
    reports = run_on_ranks(2, rank_autocast, x, dy, timeout=COMPILE_TIMEOUT_S)
    for report in reports:
        for ours, eager in zip(report["compiled"]["steps"], report["eager"]["steps"]):
            assert ours["y"].dtype == eager["y"].dtype == torch.bfloat16
            # The same kernels on the same bfloat16 values: equal, not merely close.
            torch.testing.assert_close(ours, eager, rtol=0, atol=0)
        torch.testing.assert_close(report["compiled"]["buffers"], report["eager"]["buffers"], rtol=0, atol=0)


def rank_validation_mode(x: torch.Tensor) -> dict[str, Any]:
    """Validation mode under compile: its all-gathers are not traced, so the layer runs eagerly (one break)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    module = syncnorm.SyncBatchNorm(3).double()
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, backend="aot_eager")
    with syncnorm.validation(True):
        ours = compiled(my_slice(x, SIZES))
        expected = eager(my_slice(x, SIZES))
    report = {"y": (ours, expected), "graph_breaks": sum(counters["graph_break"].values())}
    torch._dynamo.reset()
    return report


def test_validation_mode_under_compile_is_the_one_documented_graph_break() -> None:
    x = torch.randn(sum(SIZES), 3, dtype=torch.float64)
    for report in run_on_ranks(2, rank_validation_mode, x, timeout=COMPILE_TIMEOUT_S):
        torch.testing.assert_close(*report["y"], rtol=0, atol=0)
        assert report["graph_breaks"] >= 1




def rank_compiled_autograd(x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """The small model compiled (fullgraph) with its backward traced by compiled autograd, vs eager."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_module = _model("small", synced=True)
    eager_module = copy.deepcopy(compiled_module)
    graphs: dict[str, list[Any]] = {"forward": [], "backward": []}
    backend = inspecting_backend(graphs)
    compiled = torch.compile(compiled_module, backend=backend, fullgraph=True)
    with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True)):
        ours = _train(compiled, compiled_module, x, dy, "small")
    report = {"compiled": ours, "eager": _train(eager_module, eager_module, x, dy, "small"), "graphs": graphs,
              "graph_breaks": dict(counters["graph_break"]), "group_name": torch.distributed.group.WORLD.group_name,
              "compiled_autograd": dict(counters["compiled_autograd"])}
    torch._dynamo.reset()
    return report


def test_compiled_autograd_trains_like_eager_and_like_one_process() -> None:
    """torch._dynamo.compiled_autograd traces the layer's backward (its all-reduce included) into one graph."""
    x, dy = _data()
    reports = run_on_ranks(2, rank_compiled_autograd, x, dy, timeout=COMPILE_TIMEOUT_S)
    _check_against_eager_and_reference(reports, _reference("small", x, dy))
    for report in reports:
        group = report["group_name"]
        # Compiled autograd captures the backward once (reused at step 2) as one more forward-only graph, with
        # the layer's backward all-reduce inside it: training forward, backward, eval forward; no graph break.
        assert report["compiled_autograd"]["captures"] == 1, report["compiled_autograd"]
        assert report["graphs"]["forward"] == [[(n, group) for n in float64_merge(4)], [(8, group)], []]
        assert report["graphs"]["backward"] == []
        assert report["graph_breaks"] == {}
        assert report["compiled"]["collectives"] == {"forward": [], "backward": []}


def rank_global_batch_of_one() -> dict[str, Any]:
    """Rank 0 holds one sample, rank 1 none: one value per channel over the group, under fullgraph compile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = syncnorm.SyncBatchNorm(3).double()
    before = {n: b.clone() for n, b in layer.named_buffers()}
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    rank = torch.distributed.get_rank()
    error: tuple[str, str] | None = None
    try:
        compiled(torch.randn(1 - rank, 3, dtype=torch.float64))
    except Exception as e:  # noqa: BLE001 - the test inspects the type
        error = (type(e).__name__, str(e))
    unchanged = all(torch.equal(b, before[n]) for n, b in layer.named_buffers())
    # The group is still usable: a valid step after the error completes on both ranks.
    y = compiled(torch.randn(2 + rank, 3, dtype=torch.float64))
    torch._dynamo.reset()
    return {"error": error, "unchanged": unchanged, "after": (y.shape, int(layer.num_batches_tracked))}


def test_global_batch_of_one_value_raises_on_every_rank_under_compile() -> None:
    for rank, report in enumerate(run_on_ranks(2, rank_global_batch_of_one, timeout=COMPILE_TIMEOUT_S)):
        assert report["error"] is not None, rank
        kind, message = report["error"]
        assert kind == "ValueError" and "Expected more than 1 value per channel" in message, report["error"]
        assert report["unchanged"], "a failed step changed the layer's buffers"
        assert report["after"] == (torch.Size([2 + rank, 3]), 1)


# --------------------------------------------------------------------------- SyncBatchNormAct under fullgraph compile
# Compared with the float64 oracle only (torch's BatchNorm2d + the activation in one process), every step.

# Per channel: a zero weight and a small weight under a large bias (both keep their input: the custom op
# syncnorm::act_fallback_channels picks them, an index of unbacked size in the graph), a negative and an
# ordinary one (inverted from the output).
ACT_WEIGHT = torch.tensor([0.0, -0.7, 1.3, 0.02], dtype=torch.float64)
ACT_BIAS = torch.tensor([0.4, -0.3, 0.1, 2.0], dtype=torch.float64)
ACT_LAYERS = [("leaky_relu", {"negative_slope": 0.1}), ("elu", {"alpha": 0.8}), ("identity", {})]
ACT_STEPS = 3  # one eager step, then two compiled ones (unless checkpointed: three compiled ones)


class ReferenceBatchNormAct(nn.BatchNorm2d):
    """torch's BatchNorm2d followed by the activation: the oracle of SyncBatchNormAct (same state_dict keys)."""

    def __init__(self, channels: int, activation: str, negative_slope: float = 0.01, alpha: float = 1.0) -> None:
        super().__init__(channels)
        self.activation, self.negative_slope, self.alpha = activation, negative_slope, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.activation == "leaky_relu":
            return F.leaky_relu(y, self.negative_slope)
        return F.elu(y, self.alpha) if self.activation == "elu" else y


def _act_model(synced: bool, activations: list[tuple[str, dict[str, Any]]]) -> nn.Module:
    """BatchNorm + activation, once per activation in a row, float64: SyncBatchNormAct layers or the oracle's.

    No convolutions between them: compilation time is what this file spends, and the layers' own inputs and
    gradients are what is tested.
    """
    layers: list[nn.Module] = []
    for name, kwargs in activations:
        norm = syncnorm.SyncBatchNormAct(4, activation=name, **kwargs) if synced else ReferenceBatchNormAct(
            4, name, **kwargs)
        with torch.no_grad():
            norm.weight.copy_(ACT_WEIGHT)
            norm.bias.copy_(ACT_BIAS)
        layers.append(norm)
    return nn.Sequential(*layers).double()


class CheckpointedRun(nn.Module):
    """``inner`` under non-reentrant activation checkpointing (its forward recomputed in backward)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)
        return out


def _act_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(ACT_STEPS, sum(SIZES), 4, 3, 3, generator=generator, dtype=torch.float64) * 2 + 1
    dy = torch.randn(ACT_STEPS, sum(SIZES), 4, 3, 3, generator=generator, dtype=torch.float64)
    return x, dy


def _act_step(model: nn.Module, module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    inp = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    COLLECTIVES.reset()
    y = model(inp)
    (y * dy).sum().backward()
    return {"y": y.detach(), "grad_x": inp.grad, "grads": {n: p.grad.clone() for n, p in module.named_parameters()},
            "buffers": {n: b.clone() for n, b in module.named_buffers()}, "eager_collectives": list(COLLECTIVES.calls)}


def rank_act_fullgraph(backend: str, activations: list[tuple[str, dict[str, Any]]], x: torch.Tensor,
                       dy: torch.Tensor, kernels: str | None = None, checkpointed: bool = False) -> dict[str, Any]:
    """SyncBatchNormAct layers: one eager training step, then the rest compiled with fullgraph=True.

    ``checkpointed``: the layers run under non-reentrant activation checkpointing (recomputed in backward), and
    every step compiled.
    """
    from torch._dynamo.utils import counters

    with use_kernels(kernels):
        torch._dynamo.reset()
        counters.clear()
        module = _act_model(True, activations)
        model = CheckpointedRun(module) if checkpointed else module
        graphs: dict[str, list[Any]] = {"forward": [], "backward": []}
        compiled = torch.compile(model, backend=inspecting_backend(graphs) if backend == "inspect" else backend,
                                 fullgraph=True)
        steps = [_act_step(compiled if step or checkpointed else model, module, my_slice(x[step], SIZES),
                           my_slice(dy[step], SIZES)) for step in range(ACT_STEPS)]
        report = {"steps": steps, "graphs": graphs, "unique_graphs": counters["stats"]["unique_graphs"],
                  "graph_breaks": dict(counters["graph_break"]), "group_name": torch.distributed.group.WORLD.group_name}
        torch._dynamo.reset()
        return report


def _check_act_against_reference(reports: list[dict[str, Any]], activations: list[tuple[str, dict[str, Any]]],
                                 x: torch.Tensor, dy: torch.Tensor) -> None:
    reference = _act_model(False, activations)
    for step in range(ACT_STEPS):
        expected = _act_step(reference, reference, x[step], dy[step])
        for key in ("y", "grad_x"):
            _close(torch.cat([r["steps"][step][key] for r in reports]), expected[key], f"step {step} {key}")
        for name, grad in expected["grads"].items():
            _close(sum(r["steps"][step]["grads"][name] for r in reports), grad, f"step {step} grad of {name}")
        for r in reports:
            for name, buffer in expected["buffers"].items():
                _close(r["steps"][step]["buffers"][name], buffer, f"step {step} buffer {name}")


# (backend, layers, kernels, checkpointed): every activation on the inspecting backend (its graphs counted), and
# one layer each with inductor (C++ code generation with the unbacked size) and with the fused kernels (CPU
# stand-ins); every activation under activation checkpointing, compiled from the first step (the oracle runs
# without checkpointing: torch's BatchNorm would count a recomputed batch twice).
ACT_CASES = {"every-activation": ("inspect", ACT_LAYERS, None, False),
             "inductor": ("inductor", ACT_LAYERS[:1], None, False),
             "fused-kernels": ("inspect", ACT_LAYERS[1:2], "fused", False),
             "checkpointed": ("inspect", ACT_LAYERS, None, True)}


@pytest.mark.parametrize("case", ACT_CASES, ids=list(ACT_CASES))
def test_fullgraph_batchnorm_act_trains_like_one_process(case: str) -> None:
    """Zero and small weights among the channels: one graph, one all-reduce each way a layer, no eager collective."""
    backend, layers, kernels, checkpointed = ACT_CASES[case]
    x, dy = _act_data()
    reports = run_on_ranks(2, rank_act_fullgraph, backend, layers, x, dy, kernels, checkpointed,
                           timeout=COMPILE_TIMEOUT_S)
    _check_act_against_reference(reports, layers, x, dy)
    for report in reports:
        assert report["unique_graphs"] == 1 and report["graph_breaks"] == {}, report
        for step in report["steps"][0 if checkpointed else 1:]:
            assert step["eager_collectives"] == []
        if not checkpointed:  # the eager step: the same all-reduces as the graphs below
            assert [(name, numel) for name, numel, _ in report["steps"][0]["eager_collectives"]] == (
                [("all_reduce", n) for n in float64_merge(4)] * len(layers) + [("all_reduce", 2 * 4)] * len(layers))
        if backend != "inspect":
            continue
        group = report["group_name"]
        (forward,), (backward,) = report["graphs"]["forward"], report["graphs"]["backward"]
        # Every step, eager or compiled: two all-reduces a layer forward (float64 input: the global mean, then
        # the sums about it), which the compiled backward runs again for a checkpointed (recomputed) forward.
        merge = [(n, group) for n in float64_merge(4)]
        assert forward == merge * len(layers), forward
        recomputed = merge * len(layers) if checkpointed else []
        assert sorted(backward) == sorted(recomputed + [(2 * 4, group)] * len(layers)), backward
        assert "syncnorm.act_fallback_channels.default" in report["graphs"]["ops"][0]


# --------------------------------------------------------------------------- compiled steps are like any other step
# A layer's results are a function of its parameters, buffers, input and group only: compiling it after eager steps,
# or resuming from its state_dict, changes nothing.

STATELESS_CHANNELS = 4
STATELESS_MOMENTUM = 0.5  # keeps any step's error visible in the running statistics
KERNELS = ["native", "fused"]  # tests/distributed.py KERNEL_SETTINGS: aten; torch's fused kernels + Triton epilogues


def _stateless_layer(synced: bool, dtype: torch.dtype) -> nn.Module:
    """A SyncBatchNorm (or, for the oracle, torch's BatchNorm1d) with weights and bias that are not 1 and 0."""
    layer_class: Callable[..., nn.Module] = syncnorm.SyncBatchNorm if synced else nn.BatchNorm1d
    # float16/bfloat16 input: float32 parameters and statistics, as mixed-precision models have them.
    param_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    layer = layer_class(STATELESS_CHANNELS, momentum=STATELESS_MOMENTUM, dtype=param_dtype)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.1 * torch.arange(STATELESS_CHANNELS))
        layer.bias.copy_(0.1 * torch.arange(STATELESS_CHANNELS))
    return layer


def _stateless_data(means: list[float], std: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch per step, of mean ``means[step]`` and standard deviation ``std``; upstream gradients."""
    generator = torch.Generator().manual_seed(3)
    shape = (len(means), sum(SIZES), STATELESS_CHANNELS, 6)
    x = torch.tensor(means, dtype=torch.float64).view(-1, 1, 1, 1) + std * torch.randn(
        shape, generator=generator, dtype=torch.float64)
    dy = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


def _layer_step(model: Callable[..., torch.Tensor], layer: nn.Module, x: torch.Tensor,
                dy: torch.Tensor) -> dict[str, Any]:
    """One training step of ``model`` (``layer`` or its compiled form) on this rank's slice; what it produced."""
    inp = my_slice(x, SIZES).requires_grad_()
    layer.zero_grad(set_to_none=True)
    COLLECTIVES.reset()
    y = model(inp)
    forward = [(name, numel) for name, numel, _ in COLLECTIVES.calls]
    COLLECTIVES.reset()
    (y * my_slice(dy, SIZES)).sum().backward()
    return {"y": y.detach(), "grad_x": inp.grad, "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
            "buffers": {n: b.clone() for n, b in layer.named_buffers()},
            "collectives": (forward, [(name, numel) for name, numel, _ in COLLECTIVES.calls])}


EAGER_STEPS, COMPILED_STEPS = 2, 2
# Data means, step by step: eager steps at 1e6, then compiled ones at 1e6 and at 0 (another source: sums about
# anything but this batch's own mean, a zero or a stale one, lose ~1e-16 (distance / std)^2 of the variance).
AFTER_EAGER_MEANS = [1e6, 1e6, 1e6, 0.0]


def rank_compiled_after_eager(kernels: str, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """A float64 layer trained eagerly for EAGER_STEPS, then compiled (fullgraph) for COMPILED_STEPS."""
    from torch._dynamo.utils import counters

    with use_kernels(kernels):
        torch._dynamo.reset()
        counters.clear()
        layer = _stateless_layer(True, torch.float64)
        graphs: dict[str, list[Any]] = {"forward": [], "backward": []}
        compiled = torch.compile(layer, backend=inspecting_backend(graphs), fullgraph=True)
        steps = [_layer_step(layer if step < EAGER_STEPS else compiled, layer, x[step], dy[step])
                 for step in range(EAGER_STEPS + COMPILED_STEPS)]
        report = {"steps": steps, "graphs": graphs, "unique_graphs": counters["stats"]["unique_graphs"],
                  "graph_breaks": dict(counters["graph_break"]), "group_name": torch.distributed.group.WORLD.group_name}
        torch._dynamo.reset()
        return report


@pytest.mark.parametrize("kernels", KERNELS)
def test_compiled_steps_after_eager_ones_are_exact_like_any_other_step(kernels: str) -> None:
    """float64 at std 1: two eager steps at mean 1e6, then compiled ones at 1e6 and 0, each against the float64 oracle.

    The oracle (torch's BatchNorm1d in one process on the whole batch) runs every step from the layer's initial
    state: its running statistics are its own, never syncnorm's.
    """
    x, dy = _stateless_data(AFTER_EAGER_MEANS, 1.0, torch.float64)
    reports = run_on_ranks(2, rank_compiled_after_eager, kernels, x, dy, timeout=COMPILE_TIMEOUT_S)
    reference = _stateless_layer(False, torch.float64)
    for step in range(EAGER_STEPS + COMPILED_STEPS):
        what = f"{'eager' if step < EAGER_STEPS else 'compiled'} step {step}"
        inp = x[step].clone().requires_grad_()
        reference.zero_grad(set_to_none=True)
        y = reference(inp)
        (y * dy[step]).sum().backward()
        torch.testing.assert_close(torch.cat([r["steps"][step]["y"] for r in reports]), y.detach(), rtol=0,
                                   atol=1e-9, msg=lambda m, what=what: f"{what} output: {m}")
        assert inp.grad is not None
        grad_x = torch.cat([r["steps"][step]["grad_x"] for r in reports])
        torch.testing.assert_close(grad_x, inp.grad, rtol=0, atol=1e-9 * float(inp.grad.abs().max()),
                                   msg=lambda m, what=what: f"{what} input gradient: {m}")
        for name, p in reference.named_parameters():
            assert p.grad is not None
            # Each rank holds the gradient of its own share of the loss; the shares sum to the oracle's.
            ours = sum(r["steps"][step]["grads"][name] for r in reports)
            torch.testing.assert_close(ours, p.grad, rtol=0, atol=1e-9 * float(p.grad.abs().max()),
                                       msg=lambda m, what=what, name=name: f"{what} grad of {name}: {m}")
        for r in reports:
            buffers = r["steps"][step]["buffers"]
            torch.testing.assert_close(buffers["running_var"], reference.running_var, rtol=1e-10, atol=0,
                                       msg=lambda m, what=what: f"{what} running_var: {m}")
            torch.testing.assert_close(buffers["running_mean"], reference.running_mean, rtol=1e-14, atol=0,
                                       msg=lambda m, what=what: f"{what} running_mean: {m}")
            assert int(buffers["num_batches_tracked"]) == step + 1
    merge = float64_merge(STATELESS_CHANNELS)
    for report in reports:
        assert report["unique_graphs"] == 1 and report["graph_breaks"] == {}, report
        group = report["group_name"]
        # Every step the same collectives: eager ones issued by the layer, compiled ones inside the graphs.
        for step in report["steps"][:EAGER_STEPS]:
            assert step["collectives"] == ([("all_reduce", n) for n in merge], [("all_reduce", 2 * STATELESS_CHANNELS)])
        for step in report["steps"][EAGER_STEPS:]:
            assert step["collectives"] == ([], [])
        assert report["graphs"]["forward"] == [[(n, group) for n in merge]]
        assert report["graphs"]["backward"] == [[(2 * STATELESS_CHANNELS, group)]]


def rank_resumed_compiled(kernels: str, x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """A layer trained one eager and one compiled step, and a fresh one that loaded its state_dict: two more
    compiled steps of each on the same batches."""
    with use_kernels(kernels):
        torch._dynamo.reset()
        trained = _stateless_layer(True, x.dtype)
        compiled_trained = torch.compile(trained, backend="aot_eager", fullgraph=True)
        for step, model in enumerate((trained, compiled_trained)):
            _layer_step(model, trained, x[step], dy[step])
        fresh = _stateless_layer(True, x.dtype)
        with torch.no_grad():  # a fresh layer's own initial values, so that the load is what makes them equal
            for t in [*fresh.parameters(), *fresh.buffers()]:
                t.copy_(torch.full_like(t, 7))
        fresh.load_state_dict(trained.state_dict())
        compiled_fresh = torch.compile(fresh, backend="aot_eager", fullgraph=True)
        report: dict[str, list[Any]] = {"trained": [], "fresh": []}
        for step in (2, 3):
            report["trained"].append(_layer_step(compiled_trained, trained, x[step], dy[step]))
            report["fresh"].append(_layer_step(compiled_fresh, fresh, x[step], dy[step]))
        torch._dynamo.reset()
        return report


# dtype: (data mean, data std)
RESUME_CASES = {torch.float32: (1e3, 1.0), torch.float64: (1e6, 1.0), torch.float16: (1e2, 1.0),
                torch.bfloat16: (1e2, 1.0)}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", RESUME_CASES, ids=[str(d).removeprefix("torch.") for d in RESUME_CASES])
def test_fresh_layer_loading_a_trained_state_dict_continues_it_bitwise_under_compile(dtype: torch.dtype,
                                                                                     kernels: str) -> None:
    """Outputs, input gradients, parameter gradients and buffers of the next two compiled steps: bitwise equal."""
    mean, std = RESUME_CASES[dtype]
    x, dy = _stateless_data([mean] * 4, std, dtype)
    for rank, report in enumerate(run_on_ranks(2, rank_resumed_compiled, kernels, x, dy, timeout=COMPILE_TIMEOUT_S)):
        for step, (trained, fresh) in enumerate(zip(report["trained"], report["fresh"], strict=True)):
            assert trained["y"].dtype == dtype
            for key in ("y", "grad_x", "grads", "buffers"):
                what = f"rank {rank}, step {step}, {key}"
                torch.testing.assert_close(fresh[key], trained[key], rtol=0, atol=0,
                                           msg=lambda m, what=what: f"{what}: {m}")
