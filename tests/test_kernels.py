"""The kernel backends: the SYNCNORM_KERNELS seam, the fused stand-ins alone, and numerics traps (large means).

Multi-rank cases run on real Gloo ranks (tests/distributed.py, which registers the CPU stand-ins of
tests/fused_cpu.py in every rank) and compare with torch's BatchNorm on the concatenated batch in
float64 in this process, or with torch's own single-process error in the input dtype.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed import my_slice, run_on_ranks, use_kernels

import syncnorm
from syncnorm import _backends
from syncnorm._errors import SyncNormError

BACKENDS = pytest.mark.parametrize("kernels", ["native", "fused"])


def test_unknown_setting_is_a_value_error_naming_the_variable(monkeypatch: Any) -> None:
    monkeypatch.setenv("SYNCNORM_KERNELS", "triton")
    with pytest.raises(ValueError, match="SYNCNORM_KERNELS"):
        _backends.choose(torch.zeros(2, 3))


@pytest.mark.parametrize("setting,device_name", [("", "native"), ("auto", "native"), ("native", "native")])
def test_cpu_tensors_run_native_by_default(setting: str, device_name: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("SYNCNORM_KERNELS", setting)
    assert _backends.choose(torch.zeros(2, 3)).name == device_name


def test_fused_without_kernels_names_the_variable_and_the_missing_op(monkeypatch: Any) -> None:
    # This process never registers the CPU stand-ins (only the spawned ranks do).
    assert _backends.missing_fused_ops(torch.device("cpu")), "stand-ins registered in the test process"
    monkeypatch.setenv("SYNCNORM_KERNELS", "fused")
    with pytest.raises(RuntimeError, match=r"SYNCNORM_KERNELS=fused.*torch\.batch_norm_stats"):
        _backends.choose(torch.zeros(2, 3))


def rank_torch_function(x: torch.Tensor, dy: torch.Tensor, sizes: list[int]) -> dict[str, Any]:
    """torch's own SyncBatchNorm autograd Function, on the CPU stand-ins."""
    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as TorchFunction

    xl = my_slice(x, sizes).requires_grad_()
    weight = torch.linspace(0.5, 1.5, x.shape[1]).requires_grad_()
    bias = torch.linspace(-1, 1, x.shape[1]).requires_grad_()
    running_mean, running_var = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    y = TorchFunction.apply(xl, weight, bias, running_mean, running_var, 1e-5, 0.1, dist.group.WORLD,
                            dist.get_world_size())
    (y * my_slice(dy, sizes)).sum().backward()
    return {"y": y.detach(), "grad_x": xl.grad, "grad_weight": weight.grad, "grad_bias": bias.grad,
            "running_mean": running_mean, "running_var": running_var}


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 5)], ids=["NC", "NCHW"])
def test_stand_ins_run_torchs_own_sync_batchnorm_function_exactly(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [5, 3]
    x = torch.randn(sum(sizes), *shape[1:], generator=generator) * 2 + 1
    dy = torch.randn(x.shape, generator=generator)
    reports = run_on_ranks(2, rank_torch_function, x, dy, sizes)
    bn = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[x.dim()](x.shape[1], dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
        bn.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
    x64 = x.double().requires_grad_()
    y = bn(x64)
    (y * dy.double()).sum().backward()
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in reports]).double(), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in reports]).double(), x64.grad, **close)
    torch.testing.assert_close(sum(r["grad_weight"].double() for r in reports), bn.weight.grad, **close)
    torch.testing.assert_close(sum(r["grad_bias"].double() for r in reports), bn.bias.grad, **close)
    for r in reports:
        torch.testing.assert_close(r["running_mean"].double(), bn.running_mean, **close)
        torch.testing.assert_close(r["running_var"].double(), bn.running_var, **close)


class _Subclass(torch.nn.BatchNorm1d):
    """A BatchNorm subclass with its own forward: convert_model gives it a generated Sync_Subclass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.0


def rank_steps(xs: list[torch.Tensor], dys: list[torch.Tensor], sizes: list[int], kernels: str,
               layer_kwargs: dict[str, Any], subclass: bool = False) -> list[dict[str, Any]]:
    """Training steps of one SyncBatchNorm (weight 1 + 0.1 c, bias 0.1 c) on this rank's slices; with
    ``subclass``, of a converted BatchNorm subclass instead."""
    channels = xs[0].shape[1]
    dtype = torch.float64 if xs[0].dtype == torch.float64 else None
    bn = (syncnorm.convert_model(_Subclass(channels, dtype=dtype, **layer_kwargs)) if subclass
          else syncnorm.SyncBatchNorm(channels, dtype=dtype, **layer_kwargs))
    with torch.no_grad():
        bn.weight.copy_(1 + 0.1 * torch.arange(channels))
        bn.bias.copy_(0.1 * torch.arange(channels))
    reports = []
    with use_kernels(kernels):
        for x, dy in zip(xs, dys):
            xl = my_slice(x, sizes).requires_grad_()
            y = bn(xl)
            (y * my_slice(dy, sizes).to(y.dtype)).sum().backward()
            reports.append({"y": y.detach(), "grad_x": xl.grad, "running_mean": bn.running_mean.clone(),
                            "running_var": bn.running_var.clone()})
    return reports


def _reference(x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype, state: Any = None,
               **layer_kwargs: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    channels = x.shape[1]
    bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[x.dim()](
        channels, dtype=dtype, **layer_kwargs)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.1 * torch.arange(channels))
        bn.bias.copy_(0.1 * torch.arange(channels))
        if state is not None:
            bn.running_mean.copy_(state[0])
            bn.running_var.copy_(state[1])
    xr = x.detach().to(dtype).requires_grad_()
    y = bn(xr)
    (y * dy.to(dtype)).sum().backward()
    return bn, {"y": y.detach(), "grad_x": xr.grad}


FLOAT64_CASES = {"mean1e4-std1e-2": (1e4, 1e-2), "mean1e6-std1": (1e6, 1.0), "mean100-std1e-3": (100.0, 1e-3)}


@pytest.mark.parametrize("kernels,subclass", [("native", False), ("fused", False), ("native", True)],
                         ids=["native", "fused", "native-converted-subclass"])
@pytest.mark.parametrize("mean,std", FLOAT64_CASES.values(), ids=FLOAT64_CASES.keys())
def test_float64_is_exact_at_every_step_when_mean_dwarfs_spread(mean: float, std: float,
                                                                kernels: str, subclass: bool) -> None:
    """float64 accuracy at every step, the first included (converted subclasses too).

    The reference runs every step from the layer's initial state: its running statistics are its own,
    never syncnorm's (momentum 0.5 keeps any step's error visible in them)."""
    generator = torch.Generator().manual_seed(1)
    sizes = [6, 10]
    xs = [mean + std * torch.randn(16, 3, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    dys = [torch.randn(16, 3, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    reports = run_on_ranks(2, rank_steps, xs, dys, sizes, kernels, {"momentum": 0.5}, subclass)
    for step, expected in enumerate(_reference_run(xs, dys, torch.float64, momentum=0.5)):
        y = torch.cat([r[step]["y"] for r in reports])
        torch.testing.assert_close(y, expected["y"], rtol=0, atol=1e-9)
        for r in reports:
            torch.testing.assert_close(r[step]["running_var"], expected["running_var"], rtol=1e-10, atol=0)
            torch.testing.assert_close(r[step]["running_mean"], expected["running_mean"], rtol=1e-14, atol=0)


def _reference_run(xs: list[torch.Tensor], dys: list[torch.Tensor], dtype: torch.dtype,
                   **layer_kwargs: Any) -> list[dict[str, torch.Tensor]]:
    """torch's BatchNorm in ``dtype``, one process, through every step from the layer's initial state."""
    bn, first = _reference(xs[0], dys[0], dtype, **layer_kwargs)
    steps = [{**first, "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}]
    for x, dy in zip(xs[1:], dys[1:]):
        xr = x.detach().to(dtype).requires_grad_()
        y = bn(xr)
        (y * dy.to(dtype)).sum().backward()
        steps.append({"y": y.detach(), "grad_x": xr.grad, "running_mean": bn.running_mean.clone(),
                      "running_var": bn.running_var.clone()})
    return steps


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).abs().max())


HALF_CASES = {
    "fp16-dy2000": (torch.float16, 2000.0, 50.0),
    "bf16-dy2000": (torch.bfloat16, 2000.0, 50.0),
    "bf16-dy1": (torch.bfloat16, 1.0, 0.05),
}


@BACKENDS
@pytest.mark.parametrize("dtype,dy_mean,dy_noise", HALF_CASES.values(), ids=HALF_CASES.keys())
def test_half_precision_input_gradient_is_finite_and_as_exact_as_torch(dtype: torch.dtype, dy_mean: float,
                                                                        dy_noise: float, kernels: str) -> None:
    """No part of grad_x is rounded to the input dtype before the weight * invstd * dy term."""
    generator = torch.Generator().manual_seed(2)
    sizes = [5, 3]
    x = (0.01 * torch.randn(8, 4, 3, 3, generator=generator)).to(dtype)
    dy = (dy_mean + dy_noise * torch.randn(8, 4, 3, 3, generator=generator)).to(dtype)
    reports = run_on_ranks(2, rank_steps, [x], [dy], sizes, kernels, {})
    _, expected = _reference(x, dy, torch.float64)
    _, torch_own = _reference(x, dy, dtype)  # torch's BatchNorm in the input dtype, one process
    grad_x = torch.cat([r[0]["grad_x"] for r in reports])
    assert grad_x.dtype == dtype and torch.isfinite(grad_x).all()
    ours, theirs = _error(grad_x, expected["grad_x"]), _error(torch_own["grad_x"], expected["grad_x"])
    assert ours <= 2 * theirs, (ours, theirs)


@BACKENDS
@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 3, 3), (1, 4, 3, 3, "channels_last")],
                         ids=["NC-one-value-per-rank", "NCHW", "channels_last"])
def test_float32_large_mean_is_as_exact_as_torchs_float32_batchnorm(shape: tuple[Any, ...], kernels: str) -> None:
    """The mean is never folded into a bias of x; forward and grad_x within 2x torch's error."""
    generator = torch.Generator().manual_seed(3)
    dims = [d for d in shape if isinstance(d, int)]
    sizes = [dims[0], dims[0]]
    full = (2 * dims[0], *dims[1:])
    x = (-50 + 0.1 * torch.randn(full, generator=generator, dtype=torch.float64)).float()
    dy = torch.randn(full, generator=generator)
    if "channels_last" in shape:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    reports = run_on_ranks(2, rank_steps, [x], [dy], sizes, kernels, {})
    _, expected = _reference(x, dy, torch.float64)
    _, torch_own = _reference(x, dy, torch.float32)
    for key in ("y", "grad_x"):
        ours = _error(torch.cat([r[0][key] for r in reports]), expected[key])
        theirs = _error(torch_own[key], expected[key])
        assert ours <= 2 * theirs, (key, ours, theirs)


def rank_double_backward(kernels: str) -> str:
    bn = syncnorm.SyncBatchNorm(3)
    bn.layer_name = "encoder.bn1"
    x = torch.randn(4, 3, requires_grad=True)
    with use_kernels(kernels):
        (grad_x,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
        try:
            grad_x.sum().backward()
        except SyncNormError as error:
            return str(error)
    return "no error"


@BACKENDS
def test_double_backward_raises_a_clear_error_naming_the_layer(kernels: str) -> None:
    for message in run_on_ranks(2, rank_double_backward, kernels):
        assert "encoder.bn1" in message and "double backward" in message, message


def rank_random_case(case: dict[str, Any]) -> list[dict[str, Any]]:
    bn = syncnorm.SyncBatchNorm(case["channels"], dtype=torch.float64 if case["dtype"] == torch.float64 else None,
                                **case["layer_kwargs"])
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.copy_(case["weight"])
            bn.bias.copy_(case["bias"])
    reports = []
    with use_kernels(case["kernels"]):
        for x, dy in case["steps"]:
            xl = my_slice(x, case["sizes"])
            if case["channels_last"]:
                xl = xl.contiguous(memory_format=torch.channels_last)
            xl.requires_grad_()
            y = bn(xl)
            (y * my_slice(dy, case["sizes"]).to(y.dtype)).sum().backward()
            reports.append({"y": y.detach(), "grad_x": xl.grad,
                            "running_mean": None if bn.running_mean is None else bn.running_mean.clone(),
                            "running_var": None if bn.running_var is None else bn.running_var.clone()})
    return reports


def _random_case(seed: int, kernels: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def pick(options: list[Any]) -> Any:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    world = pick([2, 3])
    shape = pick([(4,), (3, 5), (2, 3, 4), (2, 2, 3, 2)])
    dtype = pick([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    mean, std = pick([(0.0, 1.0), (5.0, 0.1), (-50.0, 0.1), (1e3, 1e-2), (1e4, 1.0)])
    if dtype in (torch.float16, torch.bfloat16):
        mean = max(min(mean, 50.0), -50.0)  # a representable mean; its spread is then below the input's ulp
    sizes = [int(torch.randint(0, 5, (1,), generator=g)) for _ in range(world)]
    sizes[0] = max(sizes[0], 2)  # a global count > 1
    layer_kwargs = pick([{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None},
                         {"momentum": 0.5}])
    channels = shape[0]
    steps = []
    for _ in range(2):
        x = (mean + std * torch.randn(sum(sizes), *shape, generator=g, dtype=torch.float64)).to(dtype)
        steps.append((x, torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)))
    return {"channels": channels, "dtype": dtype, "sizes": sizes, "layer_kwargs": layer_kwargs, "steps": steps,
            "channels_last": len(shape) == 3 and bool(torch.randint(2, (1,), generator=g)), "kernels": kernels,
            "weight": torch.rand(channels, generator=g) + 0.5, "bias": torch.randn(channels, generator=g),
            "world": world}


@BACKENDS
@pytest.mark.parametrize("seed", range(6))
def test_seeded_random_cases_are_within_twice_torchs_own_error(seed: int, kernels: str) -> None:
    """Shapes, dtypes, layouts, uneven and empty ranks, layer options and mean/std drawn from a seed.

    Both steps (the first one of a fresh layer included) against the float64 reference run from the
    layer's initial state, with at most twice the error of torch's own BatchNorm in the input dtype on the
    whole batch, run from the same state (float64 input: torch's float64 BatchNorm IS the reference, so
    the bound is the README's 1e-9).
    """
    case = _random_case(seed, kernels)
    reports = run_on_ranks(case["world"], rank_random_case, case)
    first_x = case["steps"][0][0]
    kwargs = dict(case["layer_kwargs"])
    results: dict[torch.dtype, list[dict[str, torch.Tensor]]] = {}
    for dtype in (torch.float64, case["dtype"]):
        bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[
            first_x.dim()](case["channels"], dtype=dtype, **kwargs)
        with torch.no_grad():
            if bn.weight is not None:
                bn.weight.copy_(case["weight"])
                bn.bias.copy_(case["bias"])
        results[dtype] = []
        for x, dy in case["steps"]:
            xr = x.detach().to(dtype).clone().requires_grad_()
            y = bn(xr)
            (y * dy.to(dtype)).sum().backward()
            results[dtype].append({"y": y.detach(), "grad_x": xr.grad})
    for step in range(len(case["steps"])):
        expected, torch_own = results[torch.float64][step], results[case["dtype"]][step]
        for key in ("y", "grad_x"):
            ours = _error(torch.cat([r[step][key] for r in reports]), expected[key])
            theirs = _error(torch_own[key], expected[key])
            bound = 1e-9 if case["dtype"] == torch.float64 else 2 * theirs
            assert ours <= bound, (step, case["dtype"], case["sizes"], case["layer_kwargs"], key, ours, theirs)
