"""DeviceMesh, FSDP2 (``fully_shard``) and ``torch.distributed.checkpoint`` on real Gloo ranks.

Every multi-rank result is compared with torch's own BatchNorm in float64 in this process, on the
concatenation of every rank's batch (tests/reference.py), never with syncnorm itself.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from distributed import COLLECTIVES, my_slice, run_on_ranks
from reference import assert_close, reference_module, reference_step
from torch import nn

import syncnorm

C = 3
SIZES = [3, 5]  # uneven on purpose


def _batches(steps: int, sizes: list[int], shape: tuple[int, ...] = (C, 4, 4), seed: int = 0) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        offset = torch.randn(shape[0], generator=generator, dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
        x = torch.randn(sum(sizes), *shape, generator=generator, dtype=torch.float64) * 2 + offset
        dy = torch.randn(sum(sizes), *shape, generator=generator, dtype=torch.float64)
        out.append({"x": x.float(), "dy": dy.float(), "sizes": sizes})
    return out


def _meshes() -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh_2d = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    return {"1-D": init_device_mesh("cpu", (2,)), "2-D": mesh_2d, "sub-mesh": mesh_2d["dp"]}


def rank_mesh_layer_steps(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """On one rank: a SyncBatchNorm over each kind of mesh, trained on this rank's slices; everything reported."""
    results: dict[str, Any] = {}
    for name, mesh in _meshes().items():
        bn = syncnorm.SyncBatchNorm(C, process_group=mesh)
        again = syncnorm.SyncBatchNorm(C, process_group=mesh)
        model = syncnorm.convert_model(nn.Sequential(nn.BatchNorm2d(C), nn.BatchNorm2d(C)), process_group=mesh)
        groups = [bn.process_group, again.process_group, model[0].process_group, model[1].process_group]
        assert all(g is groups[0] for g in groups), f"{name}: one mesh gave several group objects"
        if mesh.ndim == 1:
            assert groups[0] is mesh.get_group()
        reports = []
        for step in batches:
            x = my_slice(step["x"], step["sizes"]).requires_grad_()
            COLLECTIVES.reset()
            y = bn(x)
            forward_calls = list(COLLECTIVES.calls)
            (y * my_slice(step["dy"], step["sizes"])).sum().backward()
            reports.append({"y": y.detach(), "grad_x": x.grad, "grad_weight": bn.weight.grad.clone(),
                            "grad_bias": bn.bias.grad.clone(), "running_mean": bn.running_mean.clone(),
                            "running_var": bn.running_var.clone(), "forward_calls": forward_calls,
                            "ranks": dist.get_process_group_ranks(bn.process_group)})
            bn.weight.grad = bn.bias.grad = None
        loader = [my_slice(step["x"], step["sizes"]) for step in batches]
        syncnorm.update_bn_stats(model, loader, process_group=mesh, progress=False)
        reports.append({"population": (model[0].running_mean.clone(), model[0].running_var.clone())})
        results[name] = reports
    return results


_MESH_RUN: list[Any] = []  # one run on the ranks for the three kinds of mesh


@pytest.mark.parametrize("kind", ["1-D", "2-D", "sub-mesh"])
def test_a_device_mesh_pools_its_ranks_with_one_all_reduce_a_step(kind: str) -> None:
    batches = _batches(3, SIZES)
    if not _MESH_RUN:
        _MESH_RUN.append(run_on_ranks(2, rank_mesh_layer_steps, batches))
    per_rank = [r[kind] for r in _MESH_RUN[0]]
    reference = reference_module(4, C, {}, torch.ones(C), torch.zeros(C))
    for i, step in enumerate(batches):
        expected = reference_step(reference, step["x"], step["dy"])
        got = [reports[i] for reports in per_rank]
        assert all(g["ranks"] == [0, 1] for g in got)
        assert_close(torch.cat([g["y"] for g in got]), expected["y"], torch.float32, f"step {i} output")
        assert_close(torch.cat([g["grad_x"] for g in got]), expected["grad_x"], torch.float32, f"step {i} grad_x")
        for key in ("grad_weight", "grad_bias"):
            assert_close(sum(g[key].double() for g in got), expected[key], torch.float32, f"step {i} {key}")
        for g in got:
            for key in ("running_mean", "running_var"):
                assert_close(g[key], expected[key], torch.float32, f"step {i} {key}")
            # One all-reduce of 2C+1 float64 values at every step, the mesh resolved to one group.
            assert g["forward_calls"] == [("all_reduce", 2 * C + 1, 8 * (2 * C + 1))], g["forward_calls"]
    everything = torch.cat([step["x"] for step in batches]).double()
    for reports in per_rank:
        mean, var = reports[-1]["population"]
        assert_close(mean, everything.mean((0, 2, 3)), torch.float32, "population mean")
        assert_close(var, everything.var((0, 2, 3)), torch.float32, "population variance")


def rank_refuse_a_mesh_without_this_rank(ndim: int) -> str:
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh("cpu", [0] if ndim == 1 else [[0]])
    try:
        syncnorm.convert_model(nn.BatchNorm2d(C), process_group=mesh)
    except ValueError as error:
        return str(error)
    return "accepted"


@pytest.mark.parametrize("ndim", [1, 2], ids=["1-D", "2-D"])
def test_a_mesh_without_this_rank_is_refused_on_that_rank(ndim: int) -> None:
    on_rank_0, on_rank_1 = run_on_ranks(2, rank_refuse_a_mesh_without_this_rank, ndim)
    assert on_rank_0 == "accepted"
    assert "syncnorm.convert_model got a DeviceMesh that does not contain this process (global rank 1" in on_rank_1


def rank_name_mesh_dimensions() -> dict[str, str]:
    """What a user gets for a mesh dimension name: from torch's mesh["nope"], and from handing syncnorm a name."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))  # as Lightning's
    errors = {}
    cases = {"mesh['nope']": lambda: mesh["nope"],
             "a name for a mesh": lambda: syncnorm.convert_model(nn.BatchNorm2d(C), "data_parallel")}
    for case, action in cases.items():
        try:
            action()
            errors[case] = "accepted"
        except (KeyError, TypeError) as error:
            errors[case] = f"{type(error).__name__}: {error}"
    return errors


def test_a_mesh_dimension_name_that_does_not_exist_is_torchs_key_error_naming_the_valid_names() -> None:
    # Nothing of syncnorm takes a dimension name: a user selects the dimension on the mesh, and torch says which
    # names exist (docs/guides/fsdp.md); a name passed to syncnorm instead of the sub-mesh is refused.
    for errors in run_on_ranks(2, rank_name_mesh_dimensions):
        assert errors["mesh['nope']"].startswith("KeyError: ")
        assert "'nope'" in errors["mesh['nope']"] and "['data_parallel', 'tensor_parallel']" in errors["mesh['nope']"]
        assert errors["a name for a mesh"] == (
            "TypeError: syncnorm.convert_model expected process_group to be a torch.distributed ProcessGroup, a "
            "DeviceMesh or None (the whole world), got the string 'data_parallel'; a mesh dimension's name does not "
            "say which mesh: pass the sub-mesh, mesh['data_parallel'].")


@pytest.mark.parametrize("bad", ["dp", 2, [0, 1]], ids=["str", "int", "list"])
def test_neither_a_group_nor_a_mesh_is_refused(bad: Any) -> None:
    with pytest.raises(TypeError, match="syncnorm.SyncBatchNorm expected process_group to be a torch.distributed "
                                        "ProcessGroup, a DeviceMesh or None"):
        syncnorm.SyncBatchNorm(C, process_group=bad)
    with pytest.raises(TypeError, match="syncnorm.convert_model expected process_group"):
        syncnorm.convert_model(nn.BatchNorm2d(C), process_group=bad)
    with pytest.raises(TypeError, match="syncnorm.update_bn_stats expected process_group"):
        syncnorm.update_bn_stats(nn.BatchNorm2d(C), [], process_group=bad)


# ---------------------------------------------------------------- FSDP2 (fully_shard) on a 1-D mesh


def _net() -> nn.Module:
    """A tiny conv net with two BatchNorm layers, the same in every process (fixed seed).

    Its activation is smooth: a ReLU would let a bfloat16 rounding of an output near 0 flip a gradient
    mask, an O(1) difference in one element whichever BatchNorm runs (seen with torch's too).
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU(),
                        nn.Conv2d(4, C, 1, bias=False), nn.BatchNorm2d(C))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def _sharded_net(param_dtype: torch.dtype | None, mesh: Any = None) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if mesh is None else mesh
    model = syncnorm.convert_model(_net())
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype))
    return model


def _report(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """What one step of a sharded model left: output, input gradient, full gradients, buffers (full tensors)."""
    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    return {"y": y.detach().float(), "grad_x": None if x.grad is None else x.grad.clone(),
            "grads": {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def rank_fsdp_steps(batches: list[dict[str, Any]], param_dtype: torch.dtype | None) -> list[dict[str, Any]]:
    model = _sharded_net(param_dtype)
    reports = []
    for step in batches:
        x = my_slice(step["x"], step["sizes"]).requires_grad_()
        y = model(x)
        (y.float() * my_slice(step["dy"], step["sizes"])).sum().backward()
        reports.append(_report(model, x, y))
        model.zero_grad(set_to_none=True)
    return reports


def _reference_steps(batches: list[dict[str, Any]], dtype: torch.dtype,
                     build: Callable[[], nn.Module] = _net) -> list[dict[str, Any]]:
    """torch's own layers in one process, the whole batch, every parameter and buffer in ``dtype``."""
    net = build().to(dtype)
    out = []
    for step in batches:
        x = step["x"].to(dtype).requires_grad_()
        y = net(x)
        (y * step["dy"].to(dtype)).sum().backward()
        out.append({"y": y.detach(), "grad_x": x.grad, "grads": {n: p.grad for n, p in net.named_parameters()},
                    "buffers": {n: b.clone() for n, b in net.named_buffers()}})
        net.zero_grad(set_to_none=True)
    return out


def _errors(per_rank: list[dict[str, Any]], expected: dict[str, Any]) -> dict[str, float]:
    """Relative errors (norm of the error over norm of the value) of the output and the input gradient, both
    concatenated over ranks, and of all parameter gradients and all floating buffers (each tensor relative to
    its own norm, then pooled): FSDP averages gradients over ranks, so W times the full gradient is the sum."""
    world = len(per_rank)
    grads = [_relative(per_rank[0]["grads"][name] * world, grad) for name, grad in expected["grads"].items()]
    buffers = [_relative(per_rank[0]["buffers"][name], buffer)
               for name, buffer in expected["buffers"].items() if buffer.is_floating_point()]
    return {"output": float(_relative(torch.cat([r["y"] for r in per_rank]), expected["y"]).norm()),
            "grad_x": float(_relative(torch.cat([r["grad_x"] for r in per_rank]), expected["grad_x"]).norm()),
            "parameter gradients": float(torch.cat(grads).norm()),
            "running statistics": float(torch.cat(buffers).norm())}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return ((actual.double() - expected.double()) / expected.double().norm()).flatten()


@pytest.mark.parametrize("param_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16-policy"])
def test_fully_shard_of_a_converted_net_matches_one_process_on_the_whole_batch(param_dtype: Any) -> None:
    batches = _batches(2, SIZES)
    per_rank = run_on_ranks(2, rank_fsdp_steps, batches, param_dtype)
    reference = _reference_steps(batches, torch.float64)
    # torch's own error in bfloat16: the same net, every parameter and buffer in bfloat16, in one process.
    torch_bf16 = _reference_steps(batches, torch.bfloat16) if param_dtype is not None else None
    for i, expected in enumerate(reference):
        got = [reports[i] for reports in per_rank]
        for r in got[1:]:  # FSDP2 has no broadcast_buffers: syncnorm keeps them identical
            for name, buffer in got[0]["buffers"].items():
                assert torch.equal(r["buffers"][name], buffer), f"step {i} {name} differs between ranks"
        assert int(got[0]["buffers"]["1.num_batches_tracked"]) == i + 1
        errors = _errors(got, expected)
        if torch_bf16 is None:
            tolerance = dict.fromkeys(errors, 1e-5)
        else:
            tolerance = {name: 2 * error for name, error in _errors([torch_bf16[i]], expected).items()}
            # torch's bfloat16 net keeps its running statistics in bfloat16 and syncnorm's stay float32 (FSDP
            # casts parameters only): their errors differ in kind, so these get the bfloat16 tolerance instead.
            del errors["running statistics"]
            for name, buffer in expected["buffers"].items():
                if buffer.is_floating_point():
                    assert_close(got[0]["buffers"][name], buffer, torch.bfloat16, f"step {i} {name}")
                    assert got[0]["buffers"][name].dtype == torch.float32
        too_large = {name: (error, tolerance[name]) for name, error in errors.items() if error > tolerance[name]}
        assert not too_large, f"step {i}: (relative error, allowed) {too_large}"


def rank_hsdp_steps(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """HSDP: fully_shard on a (replicate=2, shard=2) mesh, the syncnorm layers pooling over the whole mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    within_replica = syncnorm.SyncBatchNorm(C, process_group=mesh["shard"]).process_group
    model = _sharded_net(None, mesh=mesh)  # converted over the default group, then:
    syncnorm.convert_model(model, process_group=mesh)
    reports = []
    for step in batches:
        x = my_slice(step["x"], step["sizes"]).requires_grad_()
        y = model(x)
        (y * my_slice(step["dy"], step["sizes"])).sum().backward()
        reports.append(_report(model, x, y))
        model.zero_grad(set_to_none=True)
    return {"reports": reports, "within_replica": dist.get_process_group_ranks(within_replica),
            "pooled": dist.get_process_group_ranks(model[1].process_group)}


def test_hsdp_on_a_two_by_two_mesh_pools_all_four_ranks_like_one_process() -> None:
    batches = _batches(2, [2, 3, 4, 1])
    per_rank = run_on_ranks(4, rank_hsdp_steps, batches)
    # A sub-mesh selects this rank's slice: mesh["shard"] is {0, 1} on ranks 0 and 1, {2, 3} on ranks 2 and 3.
    assert [r["within_replica"] for r in per_rank] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(r["pooled"] == [0, 1, 2, 3] for r in per_rank)
    for i, expected in enumerate(_reference_steps(batches, torch.float64)):
        got = [r["reports"][i] for r in per_rank]
        for r in got[1:]:
            for name, buffer in got[0]["buffers"].items():
                assert torch.equal(r["buffers"][name], buffer), f"step {i} {name} differs between ranks"
        errors = _errors(got, expected)  # HSDP averages gradients over all four ranks
        assert all(error < 1e-5 for error in errors.values()), f"step {i}: {errors}"


class _Blocks(nn.Module):
    """_net's layers as two conv-BatchNorm blocks, each (``checkpointed``) under non-reentrant activation
    checkpointing: recomputed inside backward, its syncnorm layers synchronise again but must count nothing.
    The second BatchNorm is a user subclass (ScaledBatchNorm2d), which convert_model turns into a generated class."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        net = _net()
        scaled = ScaledBatchNorm2d(C)
        scaled.load_state_dict(net[4].state_dict())
        net[4] = scaled
        self.blocks = nn.ModuleList([net[0:3], net[3:5]])
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


def rank_fsdp_checkpointed_steps(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fully_shard of each checkpointed block, then of the root (the usual FSDP2 + activation checkpointing setup)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = syncnorm.convert_model(_Blocks(checkpointed=True))
    assert [type(model.blocks[0][1]).__name__, type(model.blocks[1][1]).__name__] == ["SyncBatchNorm",
                                                                                      "SyncScaledBatchNorm2d"]
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    reports = []
    for step in batches:
        x = my_slice(step["x"], step["sizes"]).requires_grad_()
        y = model(x)
        (y * my_slice(step["dy"], step["sizes"])).sum().backward()
        reports.append(_report(model, x, y))
        model.zero_grad(set_to_none=True)
    return reports


def test_activation_checkpointing_under_fully_shard_counts_each_batch_once() -> None:
    batches = _batches(2, SIZES)
    per_rank = run_on_ranks(2, rank_fsdp_checkpointed_steps, batches)
    # torch's own layers, without checkpointing: under it they would count every batch twice.
    reference = _reference_steps(batches, torch.float64, lambda: _Blocks(checkpointed=False))
    for i, expected in enumerate(reference):
        got = [reports[i] for reports in per_rank]
        for r in got[1:]:
            for name, buffer in got[0]["buffers"].items():
                assert torch.equal(r["buffers"][name], buffer), f"step {i} {name} differs between ranks"
        counts = {n: int(b) for n, b in got[0]["buffers"].items() if n.endswith("num_batches_tracked")}
        assert counts == {"blocks.0.1.num_batches_tracked": i + 1, "blocks.1.4.num_batches_tracked": i + 1}, counts
        errors = _errors(got, expected)
        assert all(error < 1e-5 for error in errors.values()), f"step {i}: {errors}"


# ---------------------------------------------------------------- torch.distributed.checkpoint


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, dy: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
    y = model(x)
    ((y * dy).sum() * scale).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return y.detach()


def rank_dcp_train(path: str, batches: list[dict[str, Any]], before: int, resume: bool,
                   scale: float = 1.0) -> dict[str, Any]:
    """FSDP2 training on this rank's slices: ``before`` steps then a DCP save, or (``resume``) a DCP load; then
    the remaining steps, each rank's loss times ``scale``. Reports the full state dict at the checkpoint and at
    the end, and every later output."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    model = _sharded_net(None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    slices = [(my_slice(s["x"], s["sizes"]), my_slice(s["dy"], s["sizes"])) for s in batches]
    if resume:
        state = get_model_state_dict(model)
        dcp.load({"model": state}, checkpoint_id=path)
        set_model_state_dict(model, state)
    else:
        for x, dy in slices[:before]:
            _train_step(model, optimizer, x, dy)
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=path)
    def full_state() -> dict[str, torch.Tensor]:  # copies: buffers come back as the model's own tensors
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {name: t.clone() for name, t in get_model_state_dict(model, options=options).items()}

    at_checkpoint = full_state()
    outputs = [_train_step(model, optimizer, x, dy, scale) for x, dy in slices[before:]]
    return {"at_checkpoint": at_checkpoint, "outputs": outputs, "final": full_state()}


def _assert_states_close(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str,
                         exact: bool = False) -> None:
    assert state.keys() == expected.keys(), what
    for name, value in expected.items():
        if exact or not value.is_floating_point():
            assert torch.equal(state[name], value), f"{what}: {name}"
        else:
            assert_close(state[name], value, torch.float32, f"{what}: {name}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
def test_a_dcp_checkpoint_of_fully_shard_on_two_ranks_resumes_in_one_process_and_on_two_and_four(tmp_path: Any) -> None:
    import torch.distributed.checkpoint as dcp

    batches, before, path = _batches(4, SIZES, seed=1), 2, str(tmp_path / "checkpoint")
    uninterrupted = run_on_ranks(2, rank_dcp_train, path, batches, before, False)
    saved = uninterrupted[0]["at_checkpoint"]  # the full state dict lands on rank 0 (cpu_offload)
    assert int(saved["1.num_batches_tracked"]) == before

    # World size 1: this process, no process group, into revert_model's plain torch model.
    plain = syncnorm.revert_model(syncnorm.convert_model(_net()))
    assert type(plain[1]) is nn.BatchNorm2d
    state = plain.state_dict()
    dcp.load({"model": state}, checkpoint_id=path, no_dist=True)
    plain.load_state_dict(state)
    _assert_states_close(plain.state_dict(), saved, "loaded in one process", exact=True)

    # Training resumes in one process on the whole batch as it went on across the two ranks (FSDP averages the
    # ranks' gradients: the loss of the whole batch over W gives the same gradient).
    model = syncnorm.convert_model(plain)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, expected in zip(batches[before:], zip(*[r["outputs"] for r in uninterrupted])):
        y = _train_step(model, optimizer, step["x"], step["dy"], scale=1 / len(SIZES))
        assert_close(y, torch.cat(expected), torch.float32, "output after resuming in one process")
    _assert_states_close(model.state_dict(), uninterrupted[0]["final"], "resumed in one process")

    resumed = run_on_ranks(2, rank_dcp_train, path, batches, before, True)
    _assert_states_close(resumed[0]["at_checkpoint"], saved, "loaded on two ranks", exact=True)
    for r, u in zip(resumed, uninterrupted):
        for y, expected in zip(r["outputs"], u["outputs"]):
            assert_close(y, expected, torch.float32, "output after resuming on two ranks")
    _assert_states_close(resumed[0]["final"], uninterrupted[0]["final"], "resumed on two ranks")

    # World size 4: the same global batches, split four ways (FSDP averages over 4 ranks: losses times 4 / 2).
    four_ways = [dict(step, sizes=[2, 1, 3, 2]) for step in batches]
    on_four = run_on_ranks(4, rank_dcp_train, path, four_ways, before, True, 2.0)
    _assert_states_close(on_four[0]["at_checkpoint"], saved, "loaded on four ranks", exact=True)
    for k, expected in enumerate(zip(*[r["outputs"] for r in uninterrupted])):
        assert_close(torch.cat([r["outputs"][k] for r in on_four]), torch.cat(expected), torch.float32,
                     f"step {k} output after resuming on four ranks")
    _assert_states_close(on_four[0]["final"], uninterrupted[0]["final"], "resumed on four ranks")


# ---------------------------------------------------------------- Join: ranks with fewer batches


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A user's BatchNorm subclass: an attribute and a method of its own, a forward around BatchNorm2d's."""

    def __init__(self, num_features: int, gain: float = 1.5) -> None:
        super().__init__(num_features)
        self.gain = gain

    def scale(self) -> float:
        return self.gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale()


class ScaledBatchNorm1d(nn.BatchNorm1d):
    """The same for BatchNorm1d, whose forward refuses 4-D input (a rank without batches must replay it in 3-D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) - 0.5


def _join_net(subclass: str = "timm") -> nn.Module:
    """_net with its first BatchNorm a subclass, converted to a generated class: timm's BatchNormAct2d, or
    (``"user"``) ScaledBatchNorm2d, with a ScaledBatchNorm1d over the flattened pixels at the end."""
    net = _net()
    if subclass == "user":
        scaled = ScaledBatchNorm2d(4)
        scaled.load_state_dict(net[1].state_dict())
        net[1] = scaled
        return nn.Sequential(*net, nn.Flatten(2), ScaledBatchNorm1d(C), nn.Unflatten(2, (4, 4)))
    from timm.layers.norm_act import BatchNormAct2d

    with_act = BatchNormAct2d(4, act_layer=nn.SiLU)
    with_act.load_state_dict(net[1].state_dict())
    net[1], net[2] = with_act, nn.Identity()
    return net


def _ddp(model: nn.Module, sync_buffers: bool = False) -> nn.Module:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # forward_sync_buffers replaced broadcast_buffers in recent torch.
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(model, **{name: sync_buffers})


def rank_join_epoch(batches: list[dict[str, Any]], counts: list[int], initial: bool, subclass: str) -> dict[str, Any]:
    """DDP + syncnorm under Join; this rank trains on its slice of the first counts[rank] steps only."""
    from torch.distributed.algorithms.join import Join

    model = syncnorm.convert_model(_join_net(subclass))
    assert type(model[1]).__name__ == f"Sync{type(_join_net(subclass)[1]).__name__}"  # a generated subclass
    ddp = _ddp(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    steps = []
    with Join([syncnorm.joinable(ddp), ddp], divide_by_initial_world_size=initial):
        for step in batches[:counts[dist.get_rank()]]:
            x = my_slice(step["x"], step["sizes"]).requires_grad_()
            y = _train_step(ddp, optimizer, x, my_slice(step["dy"], step["sizes"]))
            steps.append({"y": y, "grad_x": x.grad, "buffers": {n: b.clone() for n, b in model.named_buffers()}})
    return {"steps": steps, "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "parameters": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize(("counts", "initial", "subclass"),
                         [([2, 5], True, "timm"), ([3, 0, 2], True, "timm"), ([2, 5], False, "timm"),
                          ([2, 5], True, "user"), ([3, 0, 2], True, "user")],
                         ids=["W2", "W3-one-rank-without-batches", "W2-gradients-over-active-ranks",
                              "W2-user-subclasses", "W3-user-subclasses-one-rank-without-batches"])
def test_ranks_with_fewer_batches_under_join_match_one_process_on_the_batches_that_exist(
        counts: list[int], initial: bool, subclass: str) -> None:
    world = len(counts)
    sizes = [3 + r for r in range(world)]
    batches = _batches(max(counts), sizes, seed=2)
    per_rank = run_on_ranks(world, rank_join_epoch, batches, counts, initial, subclass)
    reference = _join_net(subclass).double()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for k, step in enumerate(batches):
        active = [r for r in range(world) if k < counts[r]]
        x = torch.cat([step["x"].split(sizes)[r] for r in active]).double().requires_grad_()
        dy = torch.cat([step["dy"].split(sizes)[r] for r in active]).double()
        # DDP averages gradients over the initial world size (or the active ranks): the batch's loss over that.
        y = _train_step(reference, optimizer, x, dy, scale=1 / (world if initial else len(active)))
        got = [per_rank[r]["steps"][k] for r in active]
        assert_close(torch.cat([g["y"] for g in got]), y, torch.float32, f"step {k} output")
        assert_close(torch.cat([g["grad_x"] for g in got]), x.grad * (world if initial else len(active)),
                     torch.float32, f"step {k} grad_x")
        for g in got:
            _assert_states_close(g["buffers"], dict(reference.named_buffers()), f"step {k} buffers")
    for r in range(world):  # the ranks that ran out first too
        _assert_states_close(per_rank[r]["buffers"], dict(reference.named_buffers()), f"rank {r} at the end")
        _assert_states_close(per_rank[r]["parameters"], dict(reference.named_parameters()), f"rank {r} at the end")


class BranchAfterHead(nn.Module):
    """Its forward calls ``branch`` (registered after ``head``) first: the layers' call order is not
    ``model.modules()`` order. Both BatchNorms have 4 channels, so replaying them in the wrong order would
    pair their all-reduces silently. With ``fuse_activation=True`` the branch's becomes a SyncBatchNormAct."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.SiLU(),
                                  nn.Conv2d(4, C, 1, bias=False))
        self.branch = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1))
        with torch.no_grad():
            for bn in (self.head[1], self.branch[1]):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.branch(x))


def _fused_only_net() -> nn.Module:
    """A net whose only syncnorm layers are SyncBatchNormAct once converted with fuse_activation=True."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                         nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ELU(),
                         nn.Conv2d(4, C, 1, bias=False))


FUSED_NETS: dict[str, Callable[[], nn.Module]] = {"branch-after-head": BranchAfterHead, "fused-only": _fused_only_net}
FUSED_LR = 0.02  # small: over 3 epochs float32 training must stay within float32's tolerance of float64's


def _hooks(model: nn.Module) -> int:
    """Every forward hook on ``model``'s modules, and every global one."""
    from torch.nn.modules import module

    return len(module._global_forward_pre_hooks) + sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def rank_join_fused_epochs(batches: list[dict[str, Any]], counts: list[int], net: str,
                           epochs: int) -> dict[str, Any]:
    """A fused model in DDP under Join for ``epochs`` epochs of this rank's first counts[rank] steps; a new
    ``joinable`` each epoch. Reports every step, the end state and the hooks left after each epoch."""
    from torch.distributed.algorithms.join import Join

    model = syncnorm.convert_model(FUSED_NETS[net](), fuse_activation=True)
    assert any(type(m) is syncnorm.SyncBatchNormAct for m in model.modules())
    ddp = _ddp(model)
    before = _hooks(ddp)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=FUSED_LR)
    steps, hooks = [], []
    for _ in range(epochs):
        with Join([syncnorm.joinable(ddp), ddp]):
            for step in batches[:counts[dist.get_rank()]]:
                x = my_slice(step["x"], step["sizes"]).requires_grad_()
                y = _train_step(ddp, optimizer, x, my_slice(step["dy"], step["sizes"]))
                steps.append({"y": y, "grad_x": x.grad, "buffers": {n: b.clone() for n, b in model.named_buffers()}})
        hooks.append(_hooks(ddp) - before)
    return {"steps": steps, "hooks": hooks, "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "parameters": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize(("net", "counts"), [("branch-after-head", [2, 0]), ("branch-after-head", [1, 3]),
                                             ("fused-only", [3, 1])],
                         ids=["branch-called-first-one-rank-without-batches", "branch-called-first-uneven",
                              "only-SyncBatchNormAct-layers"])
def test_fused_models_under_join_match_one_process_and_leave_no_hooks(net: str, counts: list[int]) -> None:
    world, epochs = len(counts), 3
    sizes = [3 + r for r in range(world)]
    batches = _batches(max(counts), sizes, seed=5)
    per_rank = run_on_ranks(world, rank_join_fused_epochs, batches, counts, net, epochs)
    reference = FUSED_NETS[net]().double()
    optimizer = torch.optim.SGD(reference.parameters(), lr=FUSED_LR)
    done = [0] * world
    for epoch in range(epochs):
        for k, step in enumerate(batches):
            active = [r for r in range(world) if k < counts[r]]
            x = torch.cat([step["x"].split(sizes)[r] for r in active]).double().requires_grad_()
            dy = torch.cat([step["dy"].split(sizes)[r] for r in active]).double()
            y = _train_step(reference, optimizer, x, dy, scale=1 / world)  # DDP: over the initial world size
            got = [per_rank[r]["steps"][done[r]] for r in active]
            what = f"epoch {epoch} step {k}"
            assert_close(torch.cat([g["y"] for g in got]), y, torch.float32, f"{what} output")
            assert_close(torch.cat([g["grad_x"] for g in got]), x.grad * world, torch.float32, f"{what} grad_x")
            for g in got:
                _assert_states_close(g["buffers"], dict(reference.named_buffers()), f"{what} buffers")
            for r in active:
                done[r] += 1
    for r in range(world):  # the ranks that ran out first too
        _assert_states_close(per_rank[r]["buffers"], dict(reference.named_buffers()), f"rank {r} at the end")
        _assert_states_close(per_rank[r]["parameters"], dict(reference.named_parameters()), f"rank {r} at the end")
        assert per_rank[r]["hooks"] == [0] * epochs, f"rank {r}: hooks left after each epoch {per_rank[r]['hooks']}"


def rank_join_misuse() -> dict[str, str]:
    from torch.distributed.algorithms.join import Join

    errors = {}
    cases = ("no syncnorm layer", "buffers synchronised in forward", "not first", "activation checkpointing",
             "inside a broadcasting DDP", "inside a broadcasting DDP, rank 1 without batches", "inside DDP")
    for case in cases:
        try:
            if case.startswith("inside"):
                net = syncnorm.convert_model(BranchAfterHead(), fuse_activation=True)  # SyncBatchNorm(Act) layers
                ddp = _ddp(net, sync_buffers="broadcasting" in case)
                with Join([syncnorm.joinable(net), ddp]):  # the module inside DDP, not DDP
                    if dist.get_rank() == 0 or "without batches" not in case:
                        ddp(torch.randn(2, C, 4, 4)).sum().backward()
            elif case == "no syncnorm layer":
                syncnorm.joinable(_ddp(_net()))
            elif case == "buffers synchronised in forward":
                syncnorm.joinable(_ddp(syncnorm.convert_model(_net()), sync_buffers=True))
            elif case == "not first":
                ddp = _ddp(syncnorm.convert_model(_net()))
                with Join([ddp, syncnorm.joinable(ddp)]):
                    ddp(torch.randn(2, C, 4, 4))
            else:
                from torch.utils.checkpoint import checkpoint

                net = syncnorm.convert_model(_net())
                ddp = _ddp(net)
                with Join([syncnorm.joinable(ddp), ddp]):
                    x = torch.randn(2, C, 4, 4, requires_grad=True)
                    checkpoint(net, x, use_reentrant=False).sum().backward()
            errors[case] = "accepted"
        except (ValueError, RuntimeError) as error:
            errors[case] = f"{type(error).__name__}: {error}"
    return errors


def test_joinable_refuses_what_would_hang_on_every_rank() -> None:
    for errors in run_on_ranks(2, rank_join_misuse):
        assert errors["no syncnorm layer"].startswith("ValueError: syncnorm.joinable found no syncnorm layer")
        assert errors["buffers synchronised in forward"].startswith(
            "ValueError: syncnorm.joinable needs DistributedDataParallel(..., forward_sync_buffers=False)")
        assert errors["not first"].startswith("RuntimeError: syncnorm.joinable(model) must come first in Join")
        assert errors["activation checkpointing"].startswith(
            "RuntimeError: syncnorm.joinable: activation checkpointing")
        for case in ("inside a broadcasting DDP", "inside a broadcasting DDP, rank 1 without batches"):
            assert errors[case].startswith(
                "ValueError: syncnorm.joinable needs DistributedDataParallel(..., forward_sync_buffers=False)"), case
            assert "pass the DistributedDataParallel model itself" in errors[case], case
        assert errors["inside DDP"].startswith(
            "ValueError: syncnorm.joinable(model) was given the module inside a DistributedDataParallel")
