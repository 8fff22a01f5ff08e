"""update_bn_stats: exact population statistics, in one process and pooled over Gloo ranks.

The oracle runs the same model in float64 in this process, records every input of every BatchNorm
layer and takes ``mean`` and ``var(unbiased=True)`` of all of them with plain torch.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torchvision
from distributed import COLLECTIVES, my_slice, rank, run_on_ranks, use_kernels
from reference import assert_close, check_model_against_reference
from timm.layers.norm_act import BatchNormAct2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncnorm


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3), BatchNormAct2d(5, momentum=0.3), nn.Flatten(), nn.Linear(5 * 2 * 2, 6), nn.BatchNorm1d(6),
    )


def batches(sizes: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (x, label) of 3x4x4 inputs with a large offset (so a sloppy variance shows) and unequal sizes."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 4, 4, generator=generator) * 3 + 50, torch.zeros(n)) for n in sizes]


def population_statistics(model: nn.Module, steps: list[list[torch.Tensor]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Float64 oracle: forward each step (a list of per-rank batches, normalised together or apart), pool inputs."""
    ref = copy.deepcopy(model).double().train()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, m in ref.named_modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for parts in steps:
            for part in parts:
                ref(part.double())
    stats = {}
    for name, inputs in seen.items():
        values = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs], dim=1)
        stats[name] = (values.mean(1), values.var(1, unbiased=True))
    return stats


def check_statistics(model: nn.Module, expected: dict[str, tuple[torch.Tensor, ...]]) -> None:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert sorted(layers) == sorted(expected)
    for name, (mean, var) in expected.items():
        assert_close(layers[name].running_mean, mean, torch.float32, f"{name} running_mean")
        assert_close(layers[name].running_var, var, torch.float32, f"{name} running_var")


def test_single_process_gives_population_mean_and_unbiased_variance() -> None:
    model = bn_model()
    model.eval()
    model[4].train()  # a mixed set of flags, restored afterwards
    model[1].num_batches_tracked.fill_(7)
    flags = [m.training for m in model.modules()]
    loader = batches([3, 5, 2], seed=1)
    expected = population_statistics(model, [[x] for x, _ in loader])
    syncnorm.update_bn_stats(model, loader, progress=False)
    check_statistics(model, expected)
    assert [m.training for m in model.modules()] == flags and True in flags
    assert int(model[1].num_batches_tracked) == 7 and int(model[4].num_batches_tracked) == 0


def test_pooled_variance_is_not_the_average_of_batch_variances() -> None:
    # Batches with different means: the population variance includes the spread between them.
    model = nn.Sequential(nn.BatchNorm1d(1))
    loader = [torch.tensor([[0.0], [2.0]]), torch.tensor([[10.0], [12.0]])]
    syncnorm.update_bn_stats(model, loader, progress=False)
    values = torch.tensor([0.0, 2.0, 10.0, 12.0], dtype=torch.float64)
    assert_close(model[0].running_mean, values.mean().view(1), torch.float32, "mean")
    assert_close(model[0].running_var, values.var(unbiased=True).view(1), torch.float32, "var")


def test_num_batches_uses_the_first_batches_only() -> None:
    model = bn_model()
    loader = batches([3, 5, 2, 4], seed=2)
    expected = population_statistics(model, [[x] for x, _ in loader[:2]])
    syncnorm.update_bn_stats(model, loader, num_batches=2, progress=False)
    check_statistics(model, expected)


def test_asking_for_more_batches_than_the_loader_has_is_an_error_that_changes_nothing() -> None:
    model = bn_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="num_batches=3 but a loader ran out after 2 batches"):
        syncnorm.update_bn_stats(model, batches([3, 2], seed=3), num_batches=3, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_failing_loader_leaves_statistics_and_flags_as_they_were() -> None:
    model = bn_model().eval()
    before = copy.deepcopy(model.state_dict())

    def loader() -> Any:
        yield batches([3], seed=4)[0]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        syncnorm.update_bn_stats(model, loader(), progress=False)
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unused_layer_is_left_alone_with_a_warning() -> None:
    model = nn.ModuleDict({"used": nn.BatchNorm1d(2), "unused": nn.BatchNorm1d(2)})
    model.forward = lambda x: model["used"](x)  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="'unused' saw 0 value"):
        syncnorm.update_bn_stats(model, [torch.randn(4, 2) + 3], progress=False)
    assert torch.equal(model["unused"].running_mean, torch.zeros(2))
    assert model["used"].running_mean.min() > 1


def rank_update_bn_stats(state: dict[str, Any], loaders: list[list[Any]], convert: bool,
                         num_batches: Any) -> dict[str, Any]:
    model = bn_model()
    model.load_state_dict(state)
    if convert:
        syncnorm.convert_model(model)
    stderr = io.StringIO()
    COLLECTIVES.reset()
    error = None
    with contextlib.redirect_stderr(stderr):
        try:
            syncnorm.update_bn_stats(model, loaders[rank()], num_batches=num_batches)
        except ValueError as e:
            error = str(e)
    return {"buffers": {n: b.clone() for n, b in model.named_buffers()}, "stderr": stderr.getvalue(),
            "calls": COLLECTIVES.names(), "error": error}


@pytest.mark.parametrize("convert", [True, False], ids=["converted", "plain-batchnorm"])
def test_two_ranks_pool_their_batches_and_agree_exactly(convert: bool) -> None:
    model = bn_model()
    loaders = [batches([3, 2, 4], seed=5), batches([2, 3, 2], seed=6)]
    reports = run_on_ranks(2, rank_update_bn_stats, model.state_dict(), loaders, convert, None)
    # A converted model normalises each step's batches together; plain BatchNorm each rank's apart.
    steps = [[torch.cat([a, b])] if convert else [a, b] for (a, _), (b, _) in zip(*loaders)]
    expected = population_statistics(model, steps)
    layers = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    for name, (mean, var) in expected.items():
        for r in reports:
            assert_close(r["buffers"][f"{name}.running_mean"], mean, torch.float32, f"{name} running_mean")
            assert_close(r["buffers"][f"{name}.running_var"], var, torch.float32, f"{name} running_var")
    for key in reports[0]["buffers"]:
        assert torch.equal(reports[0]["buffers"][key], reports[1]["buffers"][key]), f"{key} differs between ranks"
    # Per batch: one all-reduce agreeing that every rank has it (+ one per layer if converted); one
    # more finding the loaders exhausted; two for the moments of every layer together (the global
    # means, then the squares about them).
    per_layer = len(layers) if convert else 0
    assert all(r["calls"] == ["all_reduce"] * (3 * (1 + per_layer) + 3) for r in reports)
    assert "update_bn_stats" in reports[0]["stderr"] and reports[1]["stderr"] == ""


def test_two_ranks_with_unequal_loaders_stop_together() -> None:
    model = bn_model()
    loaders = [batches([3, 2, 4], seed=7), batches([2, 3], seed=8)]
    reports = run_on_ranks(2, rank_update_bn_stats, model.state_dict(), loaders, True, None)
    expected = population_statistics(model, [[torch.cat([a, b])] for (a, _), (b, _) in zip(*loaders)])
    for name, (mean, var) in expected.items():
        for r in reports:
            assert_close(r["buffers"][f"{name}.running_mean"], mean, torch.float32, f"{name} running_mean")
            assert_close(r["buffers"][f"{name}.running_var"], var, torch.float32, f"{name} running_var")
    reports = run_on_ranks(2, rank_update_bn_stats, model.state_dict(), loaders, True, 3)
    assert all("num_batches=3 but a loader ran out after 2 batches" in r["error"] for r in reports)


def rank_precise_resnet18(loaders: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = syncnorm.convert_model(torchvision.models.resnet18(num_classes=4).double())
    syncnorm.update_bn_stats(model, loaders[rank()], progress=False)
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def test_two_ranks_recompute_resnet18_statistics() -> None:
    # float64 on the ranks: the statistics of layer4 follow 17 float32 layers (see test_models.py).
    generator = torch.Generator().manual_seed(9)
    loaders = [[torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64) for _ in range(2)]
               for _ in range(2)]
    reports = run_on_ranks(2, rank_precise_resnet18, loaders)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    expected = population_statistics(model, [[torch.cat([a, b])] for a, b in zip(*loaders)])
    assert len(expected) == 20
    for name, (mean, var) in expected.items():
        for r in reports:
            assert_close(r[f"{name}.running_mean"], mean, torch.float64, f"{name} running_mean")
            assert_close(r[f"{name}.running_var"], var, torch.float64, f"{name} running_var")


def test_float64_population_statistics_are_exact_when_the_mean_dwarfs_the_spread() -> None:
    """No cancellation in update_bn_stats: one process, float64 batches at mean 1e6 / std 1."""
    generator = torch.Generator().manual_seed(0)
    data = [1e6 + torch.randn(16, 3, generator=generator, dtype=torch.float64) for _ in range(4)]
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3, dtype=torch.float64))
    syncnorm.update_bn_stats(model, data, progress=False)
    pooled = torch.cat(data)
    torch.testing.assert_close(model[0].running_mean, pooled.mean(0), rtol=1e-15, atol=0)
    torch.testing.assert_close(model[0].running_var, pooled.var(0), rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- process_group: a subset of the ranks


_GROUPS: dict[str, Any] = {}


def _group(name: str) -> Any:
    """This rank's group ``name``: "single" (this rank alone), "rank0" (rank 0 alone; None elsewhere) or "pair"
    (ranks 0 and 1; None on rank 2). None: this rank does not call update_bn_stats."""
    if not _GROUPS:  # new_group is collective: every rank builds every group, in the same order, once per pool
        _GROUPS["single"] = syncnorm.new_sync_groups(1)
        _GROUPS["rank0"] = _GROUPS["single"] if rank() == 0 else None
        pair = dist.new_group([0, 1])
        _GROUPS["pair"] = pair if rank() in (0, 1) else None
    return _GROUPS[name]


def rank_precise_over_a_group(kernels: str, *args: Any) -> dict[str, Any]:
    with use_kernels(kernels):
        return _precise_over_a_group(*args)


def _precise_over_a_group(state: dict[str, Any], loaders: list[list[Any]], group_name: str, x: torch.Tensor,
                          dy: torch.Tensor, sizes: list[int], warm: bool = False) -> dict[str, Any]:
    """update_bn_stats over ``group_name`` on the ranks of that group; then one training step over the world.

    ``warm``: first one training step over the world, its buffers then put back in place (a layer that
    trained before; update_bn_stats must leave its group as it was on every rank).
    """
    group = _group(group_name)
    model = bn_model()
    model.load_state_dict(state)
    syncnorm.convert_model(model)  # every layer's own group: the world
    if warm:
        model(my_slice(x, sizes) + 1.0).sum().backward()
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(state[name])
        model.zero_grad(set_to_none=True)
    synchronised = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    own = [m.process_group for m in synchronised]
    COLLECTIVES.reset()
    if group is not None:
        syncnorm.update_bn_stats(model, loaders[rank()], process_group=group, progress=False)
    calls = COLLECTIVES.names()
    restored = all(m.process_group is g for m, g in zip(synchronised, own)) and len(own) == 3
    precise = {n: b.clone() for n, b in model.named_buffers()}
    xl = my_slice(x, sizes).requires_grad_()
    COLLECTIVES.reset()
    y = model(xl)
    (y * my_slice(dy, sizes)).sum().backward()
    return {"precise": precise, "calls": calls, "restored": restored, "y": y.detach(), "grad_x": xl.grad,
            "step_calls": COLLECTIVES.names(),
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def _check_step_over_the_world(reports: list[dict[str, Any]], x: torch.Tensor, dy: torch.Tensor) -> None:
    """A training step after update_bn_stats synchronised over the layers' own group, the world."""
    for report in reports:
        # Each rank starts the step from its own precise statistics: its own float64 reference.
        reference = bn_model()
        reference.load_state_dict(report["precise"], strict=False)  # its parameters: bn_model()'s
        check_model_against_reference([{**r, "buffers": report["buffers"]} for r in reports], reference, x, dy)


BACKENDS = pytest.mark.parametrize("kernels", ["native", "fused"])


@BACKENDS
def test_a_group_of_one_rank_recomputes_its_own_statistics_without_the_others(kernels: str) -> None:
    """With a group of this rank alone, no layer waits for another rank."""
    model = bn_model()
    # Loaders of 2, 3 and 4 batches: a layer still synchronising over the world would hang or mix batches.
    loaders = [batches([2 + i % 2 for i in range(2 + r)], seed=20 + r) for r in range(3)]
    x, dy, sizes = torch.randn(7, 3, 4, 4), torch.randn(7, 6), [2, 3, 2]
    reports = run_on_ranks(3, rank_precise_over_a_group, kernels, model.state_dict(), loaders, "single", x, dy, sizes)
    for report, loader in zip(reports, loaders):
        assert report["calls"] == [] and report["restored"], report["calls"]
        expected = population_statistics(model, [[batch] for batch, _ in loader])
        check_statistics_in(report["precise"], expected)
    _check_step_over_the_world(reports, x, dy)


def test_rank_zero_alone_recomputes_its_statistics_while_the_others_do_something_else() -> None:
    """Precise BN on rank 0 only (before a rank-0-only evaluation): the other ranks never join it."""
    model = bn_model()
    loaders = [batches([2, 3, 2], seed=40), [], []]
    x, dy, sizes = torch.randn(7, 3, 4, 4), torch.randn(7, 6), [2, 3, 2]
    reports = run_on_ranks(3, rank_precise_over_a_group, "native", model.state_dict(), loaders, "rank0", x, dy, sizes)
    assert all(r["calls"] == [] and r["restored"] for r in reports)
    check_statistics_in(reports[0]["precise"], population_statistics(model, [[batch] for batch, _ in loaders[0]]))
    for report in reports[1:]:
        for name, value in model.named_buffers():
            assert torch.equal(report["precise"][name], value), name
    _check_step_over_the_world(reports, x, dy)


@BACKENDS
def test_a_subset_group_pools_its_ranks_only(kernels: str) -> None:
    """Ranks 0 and 1 of 3 recompute over their pair; rank 2 does not take part.

    The layers trained over the world first; update_bn_stats lends the pair's layers the pair's group only,
    so it must put their own group back: the step over the world after it then takes the same collectives
    on every rank (one all-reduce per layer each way).
    """
    model = bn_model()
    loaders = [batches([3, 2, 4], seed=30), batches([2, 3], seed=31), []]
    x, dy, sizes = torch.randn(6, 3, 4, 4), torch.randn(6, 6), [3, 1, 2]
    reports = run_on_ranks(3, rank_precise_over_a_group, kernels, model.state_dict(), loaders, "pair", x, dy, sizes,
                           True)
    assert all(r["step_calls"] == ["all_reduce"] * 6 for r in reports), [r["step_calls"] for r in reports]
    expected = population_statistics(model, [[torch.cat([a, b])] for (a, _), (b, _) in zip(*loaders[:2])])
    for report in reports[:2]:
        check_statistics_in(report["precise"], expected)
        # Per batch one all-reduce for the flag and one per layer, the exhausted flag, the two moments.
        assert report["calls"] == ["all_reduce"] * (2 * 4 + 1 + 2) and report["restored"], report["calls"]
    for name, value in model.named_buffers():  # rank 2 took no part
        assert torch.equal(reports[2]["precise"][name], value), name
    assert reports[2]["calls"] == []
    _check_step_over_the_world(reports, x, dy)


def check_statistics_in(buffers: dict[str, torch.Tensor], expected: dict[str, tuple[torch.Tensor, ...]]) -> None:
    for name, (mean, var) in expected.items():
        assert_close(buffers[f"{name}.running_mean"], mean, torch.float32, f"{name} running_mean")
        assert_close(buffers[f"{name}.running_var"], var, torch.float32, f"{name} running_var")


def rank_precise_fails_inside_a_lent_group() -> dict[str, Any]:
    """A model whose second layer (torch's SyncBatchNorm, GPU-only in training) raises inside update_bn_stats."""
    group = _group("single")
    model = nn.Sequential(syncnorm.SyncBatchNorm(3), nn.SyncBatchNorm(3))
    seen = []
    for m in model:
        m.register_forward_pre_hook(lambda m, args: seen.append(m.process_group))
    before = {n: b.clone() for n, b in model.named_buffers()}
    try:
        syncnorm.update_bn_stats(model, [torch.randn(4, 3) + 2], process_group=group, progress=False)
    except ValueError as error:
        message = str(error)
    else:
        message = ""
    return {"lent": [g is group for g in seen], "restored": [m.process_group is None for m in model],
            "message": message, "unchanged": all(torch.equal(b, before[n]) for n, b in model.named_buffers())}


def test_every_layer_gets_its_own_group_back_when_update_bn_stats_fails() -> None:
    for report in run_on_ranks(3, rank_precise_fails_inside_a_lent_group):
        assert report["lent"] == [True, True] and "GPU" in report["message"], report
        assert report["restored"] == [True, True] and report["unchanged"], report
