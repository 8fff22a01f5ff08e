"""syncnorm.SyncBatchNormAct: global-batch equivalence with float64 BatchNorm + the activation, and what it keeps.

The multi-rank cases run every activation in one task per (world size, kernel backend), on weights that
include a zero, a negative, a tiny and a small-against-its-bias channel (those the inversion cannot
serve: they keep their input), against torch's BatchNorm and activation in float64 in this process.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from distributed import COLLECTIVES, my_slice, run_on_ranks, use_kernels
from reference import assert_close, batchnorm_class

import syncnorm
import syncnorm.activation as activation_module
from syncnorm._errors import SyncNormError

CHANNELS = 7
# zero, negative, tiny (1e-30 with a zero bias: the inversion's K is small, but 1 / weight^2 would overflow),
# small weight against a large bias (fallback), a small one against a small bias (inverted), an ordinary one,
# and one that sends ELU deep into its flat tail (y rounds to -alpha there: ELU keeps that channel's input; the
# others invert it).
WEIGHT = torch.tensor([0.0, -0.7, 1e-30, 0.01, 0.05, 1.3, 8.0])
BIAS = torch.tensor([0.4, -0.3, 0.0, 2.0, 0.1, -0.5, -6.0])
ACTIVATIONS = {
    "leaky_relu": ({"activation": "leaky_relu", "negative_slope": 0.1}, lambda z: F.leaky_relu(z, 0.1)),
    "elu": ({"activation": "elu", "alpha": 0.8}, lambda z: F.elu(z, 0.8)),
    "identity": ({"activation": "identity"}, lambda z: z),
}


def _batches(sizes: list[int], steps: int, seed: int, shape: tuple[int, ...] = (CHANNELS, 3, 4),
             dtype: torch.dtype = torch.float32, first_rank_high: bool = False) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    offset = torch.randn(CHANNELS, *[1] * (len(shape) - 1), generator=generator, dtype=torch.float64)
    out = []
    for _ in range(steps):
        full = (sum(sizes), *shape)
        x = torch.randn(full, generator=generator, dtype=torch.float64) * 2 + offset
        if first_rank_high:  # the last channel well above its mean on rank 0 only: ELU's tail on the other ranks
            x[: sizes[0], -1] += 6
        out.append({"x": x.to(dtype), "dy": torch.randn(full, generator=generator).to(dtype), "sizes": sizes})
    return out


def _case(name: str, sizes: list[int], seed: int, layer: Any = None, layout: str = "contiguous",
          **batch: Any) -> dict[str, Any]:
    """A layer with activation ``name`` and options ``layer``, trained for 2 steps on ``sizes`` samples a rank."""
    return {"name": name, "kwargs": {**ACTIVATIONS[name][0], **(layer or {})}, "layout": layout,
            "steps": _batches(sizes, 2, seed, **batch)}


def _cases(sizes: list[int]) -> list[dict[str, Any]]:
    """Every activation; on 2 ranks also the other layouts, dtypes and layer options (DESIGN-NOTES section 4)."""
    cases = [_case(name, sizes, seed) for seed, name in enumerate(ACTIVATIONS)]
    if len(sizes) == 2:
        cases += [
            _case("leaky_relu", sizes, 3, layout="channels_last"),
            _case("elu", sizes, 4, {"affine": False, "momentum": None}, shape=(CHANNELS, 5)),
            _case("identity", sizes, 5, {"track_running_stats": False}, shape=(CHANNELS,)),
            _case("leaky_relu", sizes, 6, shape=(CHANNELS, 2, 3, 2), dtype=torch.bfloat16),
            # A channel inverted on one rank and kept on the other: the gradient sums still add up.
            _case("elu", sizes, 7, first_rank_high=True),
        ]
    return cases


def rank_act_steps(cases: list[dict[str, Any]], kernels: str) -> list[list[dict[str, Any]]]:
    """On one rank: for each case, a fresh layer and its steps on this rank's slices; everything it gives."""
    with use_kernels(kernels):
        return [_act_steps(case) for case in cases]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _act_steps(case: dict[str, Any]) -> list[dict[str, Any]]:
    layer = syncnorm.SyncBatchNormAct(CHANNELS, **case["kwargs"])
    if layer.affine:
        with torch.no_grad():
            layer.weight.copy_(WEIGHT)
            layer.bias.copy_(BIAS)
    reports = []
    for step in case["steps"]:
        x = _layout(my_slice(step["x"], step["sizes"]), case["layout"]).requires_grad_()
        layer.zero_grad(set_to_none=True)
        COLLECTIVES.reset()
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if case.get("checkpoint") else layer(x)
        forward_calls = list(COLLECTIVES.calls)
        COLLECTIVES.reset()
        (y * _layout(my_slice(step["dy"], step["sizes"]), case["layout"])).sum().backward()
        reports.append({"y": y.detach(), "grad_x": x.grad, "forward_calls": forward_calls,
                        "backward_calls": list(COLLECTIVES.calls), "y_dtype": y.dtype,
                        "layouts_kept": _layout(y, case["layout"]).stride() == y.stride()
                        and _layout(x.grad, case["layout"]).stride() == x.grad.stride(),
                        **{f"grad_{k}": p.grad for k, p in layer.named_parameters()},
                        **{k: v.clone() for k, v in layer.named_buffers()}})
    return reports


def _check(case: dict[str, Any], reports: list[list[dict[str, Any]]]) -> None:
    """Every rank's reports of one case against float64 BatchNorm + the activation on the whole batch."""
    dtype = case["steps"][0]["x"].dtype
    layer = {k: v for k, v in case["kwargs"].items() if k not in ("activation", "negative_slope", "alpha")}
    reference = batchnorm_class(case["steps"][0]["x"].dim())(CHANNELS, dtype=torch.float64, **layer)
    if reference.affine:
        with torch.no_grad():
            reference.weight.copy_(WEIGHT)
            reference.bias.copy_(BIAS)
    activation = ACTIVATIONS[case["name"]][1]
    for i, step in enumerate(case["steps"]):
        x = step["x"].double().requires_grad_()
        reference.zero_grad(set_to_none=True)
        y = activation(reference(x))
        (y * step["dy"].double()).sum().backward()
        got = [r[i] for r in reports]
        what = f"{case['name']} {layer} {dtype} {case['layout']} step {i}"
        assert_close(torch.cat([g["y"] for g in got]), y.detach(), dtype, f"{what} output")
        assert_close(torch.cat([g["grad_x"] for g in got]), x.grad, dtype, f"{what} grad_x")
        for name, p in reference.named_parameters():
            assert_close(sum(g[f"grad_{name}"].double() for g in got), p.grad, dtype, f"{what} summed grad {name}")
        for g in got:
            assert g["y_dtype"] == dtype and g["layouts_kept"], what
            for name, b in reference.named_buffers():
                assert_close(g[name], b, torch.float32, f"{what} {name}")


@pytest.mark.parametrize("kernels", ["native", "fused"])
@pytest.mark.parametrize("sizes", [[3, 5], [4, 0, 3]], ids=["W2-uneven", "W3-empty-rank"])
def test_matches_float64_batchnorm_and_activation(sizes: list[int], kernels: str) -> None:
    cases = _cases(sizes)
    results = run_on_ranks(len(sizes), rank_act_steps, cases, kernels)
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        _check(case, per_rank)
        for steps in per_rank:  # syncnorm.SyncBatchNorm's budget: first step two all-reduces (the merge cache)
            assert [c[0] for c in steps[0]["forward_calls"]] == ["all_reduce"] * 2
            assert steps[1]["forward_calls"] == [("all_reduce", 4 * CHANNELS + 1, (4 * CHANNELS + 1) * 8)]
            for step in steps:  # and ONE all-reduce of the 2C gradient sums
                assert step["backward_calls"] == [("all_reduce", 2 * CHANNELS, 2 * CHANNELS * 4)]


def _saved_by(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``layer(x)`` and every tensor autograd saved for its backward."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return layer(x), saved


def rank_saved_and_double_backward(x: torch.Tensor, sizes: list[int], checkpointed: dict[str, Any]) -> dict[str, Any]:
    """What autograd keeps for one training forward (sizes of the saved tensors), a double backward, and the
    ``checkpointed`` case under activation checkpointing."""
    out: dict[str, Any] = {"checkpointed": _act_steps(checkpointed)}
    for name, weight in (("inverted", WEIGHT.abs() + 0.5), ("fallback", WEIGHT)):
        layer = syncnorm.SyncBatchNormAct(CHANNELS, activation="leaky_relu")
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(BIAS)
        y, saved = _saved_by(layer, my_slice(x, sizes).requires_grad_())
        large = [t for t in saved if t.numel() > CHANNELS]  # anything but per-channel values
        out[name] = {"is_output": [t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for t in large],
                     "numel": [t.numel() for t in large], "output_numel": y.numel()}
    # A training forward under no_grad (update_bn_stats, evaluation code) chooses no channels to keep (no host sync).
    calls: list[int] = []
    choose = activation_module._fallback_channels
    activation_module._fallback_channels = lambda *args: calls.append(1) or choose(*args)  # type: ignore[assignment]
    try:
        with torch.no_grad():
            layer(my_slice(x, sizes).requires_grad_())
        out["no_grad_choices"] = len(calls)
        layer(my_slice(x, sizes).requires_grad_())
        out["grad_choices"] = len(calls)
    finally:
        activation_module._fallback_channels = choose
    layer = syncnorm.SyncBatchNormAct(CHANNELS, activation="elu")
    xl = my_slice(x, sizes).requires_grad_()
    (grad,) = torch.autograd.grad(layer(xl).square().sum(), xl, create_graph=True)
    try:
        grad.sum().backward()
        out["double_backward"] = None
    except SyncNormError as error:
        out["double_backward"] = str(error)
    return out


CHECKPOINTED = {**_case("leaky_relu", [2, 5], 7), "checkpoint": True}


@pytest.fixture(scope="module")
def saved_and_double_backward() -> list[dict[str, Any]]:
    x = torch.randn(7, CHANNELS, 3, 4, generator=torch.Generator().manual_seed(5))
    return run_on_ranks(2, rank_saved_and_double_backward, x, [4, 3], CHECKPOINTED)


def test_activation_checkpointing_counts_each_batch_once(saved_and_double_backward: list[dict[str, Any]]) -> None:
    # The forward recomputed in backward synchronises again but updates nothing (running statistics, counter).
    _check(CHECKPOINTED, [r["checkpointed"] for r in saved_and_double_backward])


def test_autograd_keeps_only_the_output(saved_and_double_backward: list[dict[str, Any]]) -> None:
    for per_rank in saved_and_double_backward:
        assert per_rank["inverted"]["is_output"] == [True], per_rank["inverted"]


def test_channels_that_cannot_be_inverted_keep_only_their_input(
    saved_and_double_backward: list[dict[str, Any]]
) -> None:
    # WEIGHT's zero, tiny and small-against-its-bias channels (3 of 7) keep their input; nothing else does.
    for per_rank in saved_and_double_backward:
        fallback = per_rank["fallback"]
        assert fallback["is_output"] == [True, False], fallback
        assert fallback["numel"][1] * CHANNELS == fallback["output_numel"] * 3


def test_training_forward_under_no_grad_chooses_nothing_to_keep(
    saved_and_double_backward: list[dict[str, Any]]
) -> None:
    for per_rank in saved_and_double_backward:
        assert (per_rank["no_grad_choices"], per_rank["grad_choices"]) == (0, 1)


def test_double_backward_is_refused_clearly(saved_and_double_backward: list[dict[str, Any]]) -> None:
    for per_rank in saved_and_double_backward:
        assert per_rank["double_backward"] is not None and "double backward" in per_rank["double_backward"]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_state_dict_round_trip_with_batchnorm2d(name: str) -> None:
    torch.manual_seed(0)
    kwargs, activation = ACTIVATIONS[name]
    bn = torch.nn.BatchNorm2d(CHANNELS)
    with torch.no_grad():
        bn.weight.copy_(WEIGHT)
        bn.bias.copy_(BIAS)
    bn.train()(torch.randn(5, CHANNELS, 3, 3))  # running statistics that are not the initial ones
    layer = syncnorm.SyncBatchNormAct(CHANNELS, **kwargs)
    layer.load_state_dict(bn.state_dict())
    assert list(layer.state_dict()) == list(bn.state_dict())
    back = torch.nn.BatchNorm2d(CHANNELS)
    back.load_state_dict(layer.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = torch.randn(4, CHANNELS, 3, 3)
    # Eval mode, and training without a process group: BatchNorm2d + the activation.
    assert_close(layer.eval()(x), activation(bn.eval()(x)), torch.float32, "eval output")
    assert_close(layer.train()(x), activation(bn.train()(x)), torch.float32, "local training output")
    assert_close(layer.running_var, bn.running_var, torch.float32, "running_var")


def test_activation_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="not invertible"):
        syncnorm.SyncBatchNormAct(3, activation="relu")
    with pytest.raises(ValueError, match="positive negative_slope"):
        syncnorm.SyncBatchNormAct(3, negative_slope=0.0)
    with pytest.raises(ValueError, match="positive alpha"):
        syncnorm.SyncBatchNormAct(3, activation="elu", alpha=-1.0)


def _timm_blocks() -> torch.nn.Module:
    from timm.layers.norm_act import BatchNormAct2d

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        BatchNormAct2d(4, act_layer=torch.nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
        torch.nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act_layer=torch.nn.ELU),
        torch.nn.Conv2d(4, 4, 1), BatchNormAct2d(4, apply_act=False),
        torch.nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act_layer=torch.nn.ReLU),
        # torch's own modules in a Sequential: BatchNorm -> ELU is fused, BatchNorm -> ReLU is not.
        torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ELU(0.5),
        torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    )


def test_convert_model_fuses_invertible_activations_and_reverts() -> None:
    import copy

    torch.manual_seed(0)
    model = _timm_blocks()
    original = copy.deepcopy(model)
    classes = [type(m) for m in model]
    parameters = {name: p for name, p in model.named_parameters()}
    activations = [m._modules.get("act") for m in model]
    modules = list(model)
    with pytest.warns(UserWarning, match=r"1 BatchNormAct2d layers unfused .*: 7 \(ReLU\)"):
        syncnorm.convert_model(model, fuse_activation=True)
    assert [type(model[i]) for i in (1, 3, 5, 9)] == [syncnorm.SyncBatchNormAct] * 4
    assert [(model[i].activation, model[i].negative_slope, model[i].alpha) for i in (1, 3, 5, 9)] == [
        ("leaky_relu", 0.2, 1.0), ("elu", 0.01, 1.0), ("identity", 0.01, 1.0), ("elu", 0.01, 0.5)]
    assert isinstance(model[10], torch.nn.Identity) and type(model[12]) is syncnorm.SyncBatchNorm
    assert type(model[7]).__name__ == "SyncBatchNormAct2d" and "act" in model[7]._modules  # converted, not fused
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == list(original.state_dict())
    # Without a process group: what the original computes in float64, forward and backward, and running stats.
    x = torch.randn(5, 3, 4, 4)
    original.double()
    model(x).square().mean().backward()
    original(x.double()).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad of {name}")
    for (name, b), c in zip(model.named_buffers(), original.buffers()):
        assert_close(b, c, torch.float32, name)

    syncnorm.revert_model(model)
    assert [type(m) for m in model] == classes and list(model) == modules  # the same module objects
    assert [m._modules.get("act") for m in model] == activations  # the same activation modules
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert not any(hasattr(model[i], "activation") or hasattr(model[i], "process_group") for i in (1, 3, 5, 9))
    assert_close(model.eval()(x), original.eval()(x.double()), torch.float32, "reverted model, eval")
