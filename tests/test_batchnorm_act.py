"""syncnorm.SyncBatchNormAct: global-batch equivalence with float64 BatchNorm + the activation, and what it keeps.

The multi-rank cases run every activation in one task per (world size, kernel backend), on weights that
include a zero, a negative, a tiny and a small-against-its-bias channel (those the inversion cannot
serve: they keep their input), against torch's BatchNorm and activation in float64 in this process.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from distributed import COLLECTIVES, my_slice, run_on_ranks, use_kernels
from reference import assert_close, batchnorm_class

import syncnorm
import syncnorm._activation as activation_module
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
    """Every activation; on 2 ranks also the other layouts, dtypes and layer options users meet."""
    cases = [_case(name, sizes, seed) for seed, name in enumerate(ACTIVATIONS)]
    if len(sizes) == 2:
        cases += [
            _case("leaky_relu", sizes, 3, layout="channels_last"),
            _case("elu", sizes, 4, {"affine": False, "momentum": None}, shape=(CHANNELS, 5)),
            _case("identity", sizes, 5, {"track_running_stats": False}, shape=(CHANNELS,)),
            _case("leaky_relu", sizes, 6, shape=(CHANNELS, 2, 3, 2), dtype=torch.bfloat16),
            # float16 directly (channels_last too). Not WEIGHT's 1e-30: weight * xhat underflows float16 to +-0,
            # where ELU's derivative (1 above zero, alpha below) is undefined for the output's dtype (torch's own
            # float16 BatchNorm + ELU loses it too); 1e-3 is small, inverted, and representable.
            {**_case("elu", sizes, 8, layout="channels_last", shape=(CHANNELS, 2, 3), dtype=torch.float16),
             "weight": torch.where(WEIGHT == 1e-30, 1e-3, WEIGHT)},
            # A channel inverted on one rank and kept on the other: the gradient sums still add up.
            _case("elu", sizes, 7, first_rank_high=True),
            # torch's keyword bias=False, as SyncBatchNorm and torch.nn.BatchNorm2d take it.
            _case("leaky_relu", sizes, 9, {"bias": False}),
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
            layer.weight.copy_(case.get("weight", WEIGHT))
            if layer.bias is not None:
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
            reference.weight.copy_(case.get("weight", WEIGHT))
            if reference.bias is not None:
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
        for steps in per_rank:  # syncnorm.SyncBatchNorm's budget: ONE all-reduce of 2C+1 float64 values a step
            for step in steps:  # and ONE all-reduce of the 2C gradient sums
                assert step["forward_calls"] == [("all_reduce", 2 * CHANNELS + 1, (2 * CHANNELS + 1) * 8)]
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
    choose = activation_module.fallback_channels
    activation_module.fallback_channels = lambda *args: calls.append(1) or choose(*args)  # type: ignore[assignment]
    try:
        with torch.no_grad():
            layer(my_slice(x, sizes).requires_grad_())
        out["no_grad_choices"] = len(calls)
        layer(my_slice(x, sizes).requires_grad_())
        out["grad_choices"] = len(calls)
    finally:
        activation_module.fallback_channels = choose
    layer = syncnorm.SyncBatchNormAct(CHANNELS, activation="elu")
    xl = my_slice(x, sizes).requires_grad_()
    (grad,) = torch.autograd.grad(layer(xl).square().sum(), xl, create_graph=True)
    try:
        grad.sum().backward()
        out["double_backward"] = None
    except SyncNormError as error:
        out["double_backward"] = str(error)
    return out


def rank_one_process(cases: list[dict[str, Any]], kernels: str) -> dict[str, Any]:
    """The steps of ``cases`` and what autograd keeps, in a process group of one rank (no synchronisation)."""
    with use_kernels(kernels):
        steps = [_act_steps(case) for case in cases]
        layer = syncnorm.SyncBatchNormAct(CHANNELS, activation="leaky_relu")
        with torch.no_grad():
            layer.weight.copy_(WEIGHT.abs() + 0.5)
            layer.bias.copy_(BIAS)
        y, saved = _saved_by(layer, torch.randn(5, CHANNELS, 3, 4).requires_grad_())
    large = [t for t in saved if t.numel() > CHANNELS]
    return {"steps": steps, "is_output": [t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                                          for t in large]}


@pytest.mark.parametrize("kernels", ["native", "fused"])
def test_one_process_keeps_only_the_output_and_matches_float64(kernels: str) -> None:
    """Memory saving has nothing to do with synchronisation: in one process the layer keeps only its output too
    (as BatchNorm + activation would keep input, normalised tensor and output), with no collective."""
    cases = _cases([6])
    (report,) = run_on_ranks(1, rank_one_process, cases, kernels)
    assert report["is_output"] == [True], report["is_output"]
    for case, steps in zip(cases, report["steps"]):
        _check(case, [steps])
        assert all(step["forward_calls"] == [] and step["backward_calls"] == [] for step in steps)


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


def test_takes_every_argument_of_syncbatchnorm_plus_the_activations() -> None:
    import inspect

    act = inspect.signature(syncnorm.SyncBatchNormAct).parameters
    for name, parameter in inspect.signature(syncnorm.SyncBatchNorm).parameters.items():
        assert name in act and act[name].kind == parameter.kind and act[name].default == parameter.default, name
    assert syncnorm.SyncBatchNormAct(3, bias=False).bias is None
    assert list(syncnorm.SyncBatchNormAct(3, bias=False).state_dict()) == list(
        torch.nn.BatchNorm2d(3, bias=False).state_dict())


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


class ResidualBlock(torch.nn.Module):
    """A BasicBlock with leaky ReLUs: conv-bn-act-conv-bn-act, then the identity added (in place or not), then act."""

    def __init__(self, add: str) -> None:
        super().__init__()
        self.add = add
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 3, 3, padding=1, bias=False), torch.nn.BatchNorm2d(3), torch.nn.LeakyReLU(0.1),
            torch.nn.Conv2d(3, 3, 3, padding=1, bias=False), torch.nn.BatchNorm2d(3), torch.nn.LeakyReLU(0.1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.add == "out += x":
            out += x
        elif self.add == "out.add_(x)":
            out.add_(x)
        elif self.add == "relu_(out)":
            out = torch.relu_(out) + x
        else:
            out = out + x
        return F.leaky_relu(out, 0.1)


RESIDUAL_ADDS = ["out += x", "out.add_(x)", "relu_(out)", "out = out + x"]


def rank_fused_residual_blocks(state: dict[str, torch.Tensor], x: torch.Tensor, dy: torch.Tensor,
                               sizes: list[int]) -> dict[str, Any]:
    """Each residual block fused and trained one step on this rank's slice: the error, or what it gives."""
    reports: dict[str, Any] = {}
    for add in RESIDUAL_ADDS:
        model = ResidualBlock(add)
        model.load_state_dict(state)
        syncnorm.convert_model(model, fuse_activation=True)
        assert type(model.body[4]) is syncnorm.SyncBatchNormAct
        xl = my_slice(x, sizes).requires_grad_()
        y = model(xl)
        try:
            (y * my_slice(dy, sizes)).sum().backward()
        except RuntimeError as error:
            reports[add] = {"error": str(error)}
            continue
        reports[add] = {"y": y.detach(), "grad_x": xl.grad, "grads": {n: p.grad for n, p in model.named_parameters()},
                        "buffers": {n: b.clone() for n, b in model.named_buffers()}}
    return reports


def test_an_in_place_add_on_a_fused_output_is_an_error_naming_the_layer_and_the_fusion() -> None:
    from reference import check_model_against_reference

    generator = torch.Generator().manual_seed(4)
    sizes = [3, 2]
    x = torch.randn(5, 3, 4, 4, generator=generator)
    dy = torch.randn(5, 3, 4, 4, generator=generator)
    torch.manual_seed(4)
    state = ResidualBlock("out = out + x").state_dict()
    per_rank = run_on_ranks(2, rank_fused_residual_blocks, state, x, dy, sizes)
    for reports in per_rank:
        for add in RESIDUAL_ADDS[:3]:
            message = reports[add].get("error", "trained")
            assert "syncnorm.SyncBatchNormAct 'body.4'" in message and "modified in place" in message, (add, message)
            assert "fuse_activation=False" in message and "out = out + identity" in message, (add, message)
    # Written out of place, the fused block trains as torch's float64 BatchNorm + leaky ReLU on the whole batch.
    reference = ResidualBlock("out = out + x")
    reference.load_state_dict(state)
    check_model_against_reference([r["out = out + x"] for r in per_rank], reference, x, dy)


# --------------------------------------------------------------------------- works with the rest of syncnorm

class TorchBatchNormAct(torch.nn.BatchNorm2d):
    """torch's BatchNorm2d followed by one of ACTIVATIONS: the oracle's layer (the same state_dict keys)."""

    def __init__(self, channels: int, name: str) -> None:
        super().__init__(channels)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name][1](super().forward(x))


def _blocks(synced: bool) -> torch.nn.Sequential:
    """conv -> BatchNorm + activation, once per activation: SyncBatchNormAct layers, or torch's for the oracle."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, name in enumerate(ACTIVATIONS):
        # No conv bias: BatchNorm cancels it, its gradient is zero (no relative error to speak of).
        layers.append(torch.nn.Conv2d(3 if i == 0 else CHANNELS, CHANNELS, 3 if i == 0 else 1, bias=False))
        norm = syncnorm.SyncBatchNormAct(CHANNELS, **ACTIVATIONS[name][0]) if synced else TorchBatchNormAct(
            CHANNELS, name)
        with torch.no_grad():
            norm.weight.copy_(WEIGHT)
            norm.bias.copy_(BIAS)
        layers.append(norm)
    return torch.nn.Sequential(*layers)


BLOCK_SIZES = [3, 5]


def _block_steps(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], sizes: Optional[list[int]],
                 autocast: bool = False) -> list[dict[str, Any]]:
    """Training steps of ``model`` on this rank's part of each batch (``sizes`` None: the whole batch)."""
    reports = []
    for batch in batches:
        x, dy = (batch["x"], batch["dy"]) if sizes is None else (my_slice(batch["x"], sizes),
                                                               my_slice(batch["dy"], sizes))
        x = x.to(next(model.parameters()).dtype).requires_grad_()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        (y * dy.to(y.dtype)).sum().backward()
        reports.append({"y": y.detach(), "grad_x": x.grad, "y_dtype": y.dtype,
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                        "buffers": {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}})
    return reports


def _block_batches(steps: int, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(9)
    out = []
    for _ in range(steps):
        x = torch.randn(sum(sizes), 3, 5, 5, generator=generator) * 2 + 1
        out.append({"x": x, "dy": torch.randn(sum(sizes), CHANNELS, 3, 3, generator=generator).bfloat16()})
    return out


def rank_blocks_under_autocast(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    return _block_steps(_blocks(synced=True), batches, BLOCK_SIZES, autocast=True)


def _relative_errors(got: list[dict[str, Any]], expected: dict[str, Any]) -> dict[str, float]:
    """Norm of the error over norm of the value: output and input gradient (concatenated over ranks), parameter
    gradients (summed over ranks; each tensor relative to its own norm, then pooled) and running statistics."""

    def relative(actual: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return ((actual.double() - value.double()) / value.double().norm()).flatten()

    grads = [relative(sum(g["grads"][n].double() for g in got), v) for n, v in expected["grads"].items()]
    buffers = [relative(got[0]["buffers"][n], v) for n, v in expected["buffers"].items()]
    return {"output": float(relative(torch.cat([g["y"] for g in got]), expected["y"]).norm()),
            "grad_x": float(relative(torch.cat([g["grad_x"] for g in got]), expected["grad_x"]).norm()),
            "parameter gradients": float(torch.cat(grads).norm()),
            "running statistics": float(torch.cat(buffers).norm())}


def test_bfloat16_autocast_errs_at_most_twice_as_much_as_torch_batchnorm() -> None:
    """conv -> SyncBatchNormAct under CPU bf16 autocast on 2 ranks vs torch's BatchNorm2d + activation under the
    same autocast in one process: each error against float64 is at most twice torch's own."""
    batches = _block_batches(2, BLOCK_SIZES)
    per_rank = run_on_ranks(2, rank_blocks_under_autocast, batches)
    expected = _block_steps(_blocks(synced=False).double(), batches, None)
    torch_bf16 = _block_steps(_blocks(synced=False), batches, None, autocast=True)
    for i in range(len(batches)):
        got = [r[i] for r in per_rank]
        assert all(g["y_dtype"] == torch.bfloat16 for g in got) and torch_bf16[i]["y_dtype"] == torch.bfloat16
        errors = _relative_errors(got, expected[i])
        tolerance = {name: 2 * error for name, error in _relative_errors([torch_bf16[i]], expected[i]).items()}
        too_large = {name: (error, tolerance[name]) for name, error in errors.items() if error > tolerance[name]}
        assert not too_large, f"step {i}: (relative error, allowed) {too_large}"


def rank_validation(x: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """In validation mode: a training step alike on every rank, then one where rank 1 feeds float64."""
    layer = syncnorm.SyncBatchNormAct(CHANNELS, **ACTIVATIONS["elu"][0])
    layer.layer_name = "features.act"
    with torch.no_grad():
        layer.weight.copy_(WEIGHT)
        layer.bias.copy_(BIAS)
    xl = my_slice(x, BLOCK_SIZES).requires_grad_()
    COLLECTIVES.reset()
    with syncnorm.validation():
        y = layer(xl)
        (y * my_slice(dy, BLOCK_SIZES)).sum().backward()
    out: dict[str, Any] = {"y": y.detach(), "grad_x": xl.grad, "calls": COLLECTIVES.names(),
                           **{f"grad_{k}": p.grad for k, p in layer.named_parameters()}}
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    odd = torch.distributed.get_rank() == 1
    try:
        with syncnorm.validation():
            layer(my_slice(x, BLOCK_SIZES).to(torch.float64 if odd else torch.float32))
        out["error"] = None
    except SyncNormError as error:
        out["error"] = str(error)
    out["unchanged"] = all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    return out


def test_validation_mode_passes_alike_ranks_and_names_a_mismatch() -> None:
    x = torch.randn(sum(BLOCK_SIZES), CHANNELS, 2, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    per_rank = run_on_ranks(2, rank_validation, x, dy)
    reference = batchnorm_class(3)(CHANNELS, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(WEIGHT)
        reference.bias.copy_(BIAS)
    x64 = x.double().requires_grad_()
    y = ACTIVATIONS["elu"][1](reference(x64))
    (y * dy.double()).sum().backward()
    assert_close(torch.cat([r["y"] for r in per_rank]), y.detach(), torch.float32, "validated output")
    assert_close(torch.cat([r["grad_x"] for r in per_rank]), x64.grad, torch.float32, "validated grad_x")
    for name, p in reference.named_parameters():
        assert_close(sum(r[f"grad_{name}"].double() for r in per_rank), p.grad, torch.float32, f"grad {name}")
    for r in per_rank:
        # Validation's all-gather before the forward's all-reduce and before the backward's.
        assert r["calls"] == ["all_gather", "all_reduce", "all_gather", "all_reduce"], r["calls"]
        assert r["error"] is not None and "layer 'features.act'" in r["error"], r["error"]
        assert "input dtype differs (rank 0: torch.float32, rank 1: torch.float64)" in r["error"], r["error"]
        assert r["unchanged"]


def rank_update_bn_stats(loaders: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    model = _blocks(synced=True)
    syncnorm.update_bn_stats(model, loaders[torch.distributed.get_rank()], progress=False)
    return {n: b for n, b in model.named_buffers()}


def test_update_bn_stats_sets_population_statistics_of_act_layers() -> None:
    """Precise BN through SyncBatchNormAct layers (each normalising with its step's global batch): the running
    statistics are float64 torch's population statistics of every input each layer saw on every rank."""
    from test_precise import population_statistics

    generator = torch.Generator().manual_seed(6)
    steps = [torch.randn(n, 3, 5, 5, generator=generator) * 3 + 20 for n in (7, 5)]
    sizes = [[3, 4], [4, 1]]
    loaders = [[step.split(size)[r] for step, size in zip(steps, sizes)] for r in range(2)]
    per_rank = run_on_ranks(2, rank_update_bn_stats, loaders)
    expected = population_statistics(_blocks(synced=False), [[step] for step in steps])
    assert len(expected) == len(ACTIVATIONS)
    for buffers in per_rank:
        for name, (mean, var) in expected.items():
            assert_close(buffers[f"{name}.running_mean"], mean, torch.float32, f"{name} running_mean")
            assert_close(buffers[f"{name}.running_var"], var, torch.float32, f"{name} running_var")
            assert int(buffers[f"{name}.num_batches_tracked"]) == 0  # restored


def rank_host_syncs(batches: list[dict[str, Any]], kernels: str, capture: bool) -> list[list[dict[str, Any]]]:
    """Every activation's layer, fresh, trained on ``batches``; ``capture``: as while a CUDA graph is captured
    (``_function.capturing`` answers True, as tests/test_capture_branch.py forces it). Host syncs counted."""
    from test_op_counts import CountOps

    from syncnorm import _function

    original = _function.capturing
    if capture:
        _function.capturing = lambda device: True  # type: ignore[assignment]
    try:
        with use_kernels(kernels):
            out = []
            for name in ACTIVATIONS:
                layer = syncnorm.SyncBatchNormAct(CHANNELS, **ACTIVATIONS[name][0])
                with torch.no_grad():
                    layer.weight.copy_(WEIGHT)
                    layer.bias.copy_(BIAS)
                reports = []
                for batch in batches:
                    x = my_slice(batch["x"], batch["sizes"]).requires_grad_()
                    layer.zero_grad(set_to_none=True)
                    with CountOps() as counted:
                        y, saved = _saved_by(layer, x)
                        (y * my_slice(batch["dy"], batch["sizes"])).sum().backward()
                    reports.append({"y": y.detach(), "grad_x": x.grad, "syncs": counted.syncs, "y_dtype": y.dtype,
                                    "layouts_kept": y.is_contiguous() and x.grad.is_contiguous(),
                                    "keeps_input": any(t is x for t in saved),
                                    **{f"grad_{k}": p.grad for k, p in layer.named_parameters()},
                                    **{k: v.clone() for k, v in layer.named_buffers()}})
                out.append(reports)
            return out
    finally:
        _function.capturing = original


@pytest.mark.parametrize("kernels", ["native", "fused"])
def test_capture_branch_keeps_the_whole_input_without_host_sync(kernels: str) -> None:
    # (N, C) batches: a rank of one sample and an empty rank take the device-side checks of the global count.
    steps = [[3, 4], [1, 3], [0, 4]]
    generator = torch.Generator().manual_seed(12)
    batches = []
    for sizes in steps:
        x = torch.randn(sum(sizes), CHANNELS, generator=generator) * 2 + 1
        batches.append({"x": x, "dy": torch.randn(x.shape, generator=generator), "sizes": sizes})
    per_rank = run_on_ranks(2, rank_host_syncs, batches, kernels, True)
    for i, name in enumerate(ACTIVATIONS):
        case = {"name": name, "kwargs": ACTIVATIONS[name][0], "layout": "contiguous", "steps": batches}
        _check(case, [r[i] for r in per_rank])
        for reports in per_rank:
            for report in reports[i]:
                assert report["syncs"] == [] and report["keeps_input"], (name, report["syncs"])


def test_training_step_takes_one_host_sync_to_choose_the_kept_channels() -> None:
    x = torch.randn(7, CHANNELS, 2, generator=torch.Generator().manual_seed(13))
    batches = [{"x": x, "dy": torch.randn(x.shape), "sizes": [3, 4]}]
    for reports in run_on_ranks(2, rank_host_syncs, batches, "native", False):
        for (report,) in reports:  # the nonzero of _fallback_channels; only the channels that need it are kept
            assert report["syncs"] == ["nonzero"] and not report["keeps_input"], report["syncs"]
