"""Global-batch equivalence on real Gloo ranks: the results, the collectives, the cases users meet.

Every test runs syncnorm on W spawned ranks, each on its slice of a global batch, and compares
output, input gradient, summed parameter gradients and running statistics with torch's own
BatchNorm run in float64 in this process on the whole batch.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
from distributed import COLLECTIVES, my_slice, rank, run_on_ranks, use_kernels
from reference import assert_close, check_model_against_reference, reference_module, reference_step

import syncnorm

_GROUPS: dict[int, Any] = {}


def _subgroup(size: int) -> Any:
    if size not in _GROUPS:
        _GROUPS[size] = syncnorm.new_sync_groups(size)
    return _GROUPS[size]


def _layout(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    if memory_format == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _is_channels_last(t: torch.Tensor) -> bool:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.dim() >= 4 and t.is_contiguous(memory_format=fmt) and not t.is_contiguous()


def rank_train_steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """On one rank: build the layer, run every step of ``spec`` on this rank's slice, report everything."""
    with use_kernels(spec.get("kernels")):
        reports = _train_steps(spec)
    # Back to CPU tensors for the comparison in the test process (a no-op for CPU runs).
    return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in r.items()} for r in reports]


def _train_steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    group = _subgroup(spec["group_size"]) if spec.get("group_size") else None
    device = torch.device(spec.get("device", "cpu"))
    bn = syncnorm.SyncBatchNorm(spec["channels"], process_group=group, device=device, **spec["layer_kwargs"])
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(spec["weight"])
            bn.weight.requires_grad_(not spec.get("frozen", False))
        if bn.bias is not None:
            bn.bias.copy_(spec["bias"])
            bn.bias.requires_grad_(not spec.get("frozen", False))
    bn.train(spec.get("mode", "train") != "eval")
    # "compile": a torch.compile backend; the layer then runs compiled, fullgraph (the traceable path).
    layer = torch.compile(bn, backend=spec["compile"], fullgraph=True) if spec.get("compile") else bn
    reports = []
    for step in spec["steps"]:
        x = _layout(my_slice(step["x"], step["sizes"]).to(device), spec.get("memory_format", "contiguous"))
        x.requires_grad_(spec.get("input_requires_grad", True))
        for p in bn.parameters():
            p.grad = None
        COLLECTIVES.reset()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.get("autocast", False)):
            if spec.get("no_grad"):
                with torch.no_grad():
                    y = layer(x)
            else:
                y = layer(x)
        forward_calls = list(COLLECTIVES.calls)
        COLLECTIVES.reset()
        report: dict[str, Any] = {"y": y.detach().clone(), "y_channels_last": _is_channels_last(y),
                                  "y_dtype": y.dtype, "forward_calls": forward_calls}
        dy = step.get("dy")
        if dy is not None and y.requires_grad:
            upstream = _layout(my_slice(dy, step["sizes"]).to(device), spec.get("memory_format", "contiguous"))
            (y * upstream.to(y.dtype)).sum().backward()
            report["grad_x"] = None if x.grad is None else x.grad.clone()
            report["grad_x_channels_last"] = x.grad is not None and _is_channels_last(x.grad)
            report["grad_weight"] = None if bn.weight is None or bn.weight.grad is None else bn.weight.grad.clone()
            report["grad_bias"] = None if bn.bias is None or bn.bias.grad is None else bn.bias.grad.clone()
        report["backward_calls"] = list(COLLECTIVES.calls)
        report["running_mean"] = None if bn.running_mean is None else bn.running_mean.clone()
        report["running_var"] = None if bn.running_var is None else bn.running_var.clone()
        report["num_batches_tracked"] = None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone()
        reports.append(report)
    return reports


def make_spec(shape: tuple[int, ...], sizes: list[int], *, steps: int = 1, dtype: torch.dtype = torch.float32,
              seed: int = 0, **options: Any) -> dict[str, Any]:
    """A global batch of ``sum(sizes)`` samples of ``shape[1:]``, split over ranks as ``sizes``."""
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    batches = []
    for _ in range(steps):
        full = (sum(sizes), *shape[1:])
        # Per-channel offsets and scales, so a layer that mixes channels or ranks up shows.
        offset = torch.randn(channels, generator=generator, dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))
        x = torch.randn(full, generator=generator, dtype=torch.float64) * 2 + offset
        dy = torch.randn(full, generator=generator, dtype=torch.float64)
        # The upstream gradient arrives in the output's dtype: round it the same way for the reference.
        out_dtype = torch.bfloat16 if options.get("autocast") else dtype
        batches.append({"x": x.to(dtype), "dy": dy.to(out_dtype), "sizes": list(sizes)})
    return {
        "channels": channels,
        "steps": batches,
        "weight": torch.rand(channels, generator=generator) + 0.5,
        "bias": torch.randn(channels, generator=generator),
        "layer_kwargs": options.pop("layer_kwargs", {}),
        **options,
    }


def check_against_reference(spec: dict[str, Any], reports: list[list[dict[str, Any]]],
                            ranks: Optional[list[int]] = None) -> None:
    """Compare the ranks ``ranks`` (default all) with the float64 BatchNorm on their concatenated batches."""
    ranks = list(range(len(reports))) if ranks is None else ranks
    dtype = spec["steps"][0]["x"].dtype
    tol_dtype = torch.bfloat16 if spec.get("autocast") else dtype
    dim = spec["steps"][0]["x"].dim()
    ref = reference_module(dim, spec["channels"], spec["layer_kwargs"], spec["weight"], spec["bias"])
    ref.train(spec.get("mode", "train") != "eval")
    for i, step in enumerate(spec["steps"]):
        parts_x = step["x"].split(step["sizes"])
        parts_dy = step["dy"].split(step["sizes"])
        x = torch.cat([parts_x[r] for r in ranks])
        dy = torch.cat([parts_dy[r] for r in ranks])
        wants_grad = not spec.get("no_grad") and spec.get("mode", "train") != "eval"
        expected = reference_step(ref, x, dy if wants_grad else None)
        got = [reports[r][i] for r in ranks]
        assert_close(torch.cat([g["y"] for g in got]), expected["y"], tol_dtype, f"step {i} output")
        for g in got:
            assert g["y_dtype"] == (torch.bfloat16 if spec.get("autocast") else dtype)
            for key in ("running_mean", "running_var"):
                if expected[key] is None:
                    assert g[key] is None
                else:
                    assert_close(g[key], expected[key], torch.float32, f"step {i} {key}")
            if expected["num_batches_tracked"] is not None:
                assert int(g["num_batches_tracked"]) == int(expected["num_batches_tracked"])
        if not wants_grad:
            continue
        if spec.get("input_requires_grad", True):
            assert_close(torch.cat([g["grad_x"] for g in got]), expected["grad_x"], tol_dtype, f"step {i} grad_x")
        else:
            assert all(g["grad_x"] is None for g in got)
        for key in ("grad_weight", "grad_bias"):
            if expected[key] is None or spec.get("frozen"):
                assert all(g[key] is None for g in got), key
            else:
                total = torch.stack([g[key].double() for g in got]).sum(0)
                assert_close(total, expected[key], torch.float32 if tol_dtype != torch.bfloat16 else tol_dtype,
                             f"step {i} summed {key}")


# Every multi-rank case runs once per kernel backend; "fused" runs torch's fused SyncBatchNorm kernels
# through the CPU stand-ins of tests/fused_cpu.py (registered in every rank).
BACKENDS = pytest.mark.parametrize("kernels", ["native", "fused"])

SHAPES = {
    "NC": (0, 5),
    "NCL": (0, 4, 7),
    "NCHW": (0, 3, 5, 4),
    "NCDHW": (0, 2, 3, 4, 3),
}


@BACKENDS
@pytest.mark.parametrize("world_size", [1, 2, 3, 4], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_single_process_batchnorm(world_size: int, shape: tuple[int, ...], kernels: str) -> None:
    sizes = [3 + r for r in range(world_size)]  # uneven on purpose
    spec = make_spec(shape, sizes, steps=2)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(world_size, rank_train_steps, spec))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA tensors over Gloo, ranks sharing GPU 0)")
@pytest.mark.parametrize("world_size", [2, 3, 4], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("case", ["NCHW", "channels_last", "bfloat16", "empty-rank"])
def test_cuda_tensors_over_gloo_match_single_process_batchnorm(world_size: int, case: str) -> None:
    # SYNCNORM_KERNELS unset: CUDA tensors run the fused backend, torch's real CUDA kernels.
    sizes = [3 + r for r in range(world_size)]
    if case == "empty-rank":
        sizes[0] = 0
    spec = make_spec((0, 3, 4, 5), sizes, steps=2, dtype=torch.bfloat16 if case == "bfloat16" else torch.float32,
                     memory_format="channels_last" if case == "channels_last" else "contiguous")
    spec["device"] = "cuda:0"
    check_against_reference(spec, run_on_ranks(world_size, rank_train_steps, spec))


# The other two kernel settings, on a representative subset: the native kernels with the Triton
# per-channel kernels (what SYNCNORM_KERNELS=native runs on a GPU) and the fused kernels with the aten
# per-channel ops (a GPU without Triton).
OTHER_SETTINGS_CASES = {
    "NCHW-W3": ((0, 3, 5, 4), [3, 4, 2], {}),
    "NC-W2-no-affine": ((0, 5), [4, 3], {"layer_kwargs": {"affine": False}}),
    "channels_last-bf16-W2": ((0, 3, 4, 4), [2, 3], {"memory_format": "channels_last", "dtype": torch.bfloat16}),
    "empty-rank-W3": ((0, 3, 4, 4), [0, 4, 2], {}),
    "momentum-None-W2": ((0, 3, 4), [3, 3], {"layer_kwargs": {"momentum": None}}),
}


@pytest.mark.parametrize("kernels", ["native-triton", "fused-aten"])
@pytest.mark.parametrize("case", list(OTHER_SETTINGS_CASES))
def test_other_kernel_settings_match_single_process_batchnorm(case: str, kernels: str) -> None:
    shape, sizes, options = OTHER_SETTINGS_CASES[case]
    spec = make_spec(shape, sizes, steps=2, **options)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(len(sizes), rank_train_steps, spec))


@BACKENDS
@pytest.mark.parametrize("sizes", [[4, 0], [0, 5, 2], [0, 0, 3, 1], [1, 1]],
                         ids=["empty-last", "empty-first", "two-empty", "one-each"])
def test_uneven_and_empty_ranks(sizes: list[int], kernels: str) -> None:
    spec = make_spec((0, 3, 4, 4), sizes, steps=2)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(len(sizes), rank_train_steps, spec))


@BACKENDS
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (0, 2, 3, 4, 3)], ids=["channels_last", "channels_last_3d"])
def test_channels_last_is_kept_in_output_and_gradient(shape: tuple[int, ...], kernels: str) -> None:
    spec = make_spec(shape, [3, 2], memory_format="channels_last")
    spec["kernels"] = kernels
    reports = run_on_ranks(2, rank_train_steps, spec)
    check_against_reference(spec, reports)
    for per_rank in reports:
        assert per_rank[0]["y_channels_last"] and per_rank[0]["grad_x_channels_last"]


LAYER_OPTIONS = {
    "affine-false": {"affine": False},
    "no-bias": {"bias": False},
    "no-running-stats": {"track_running_stats": False},
    "momentum-none": {"momentum": None},
    "momentum-0.3": {"momentum": 0.3},
    "eps-1e-3": {"eps": 1e-3},
}


@BACKENDS
@pytest.mark.parametrize("layer_kwargs", LAYER_OPTIONS.values(), ids=LAYER_OPTIONS.keys())
def test_layer_options(layer_kwargs: dict[str, Any], kernels: str) -> None:
    spec = make_spec((0, 3, 4), [3, 4], steps=3, layer_kwargs=dict(layer_kwargs))
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(2, rank_train_steps, spec))


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_low_and_high_precision_input_with_fp32_parameters(dtype: torch.dtype, kernels: str) -> None:
    spec = make_spec((0, 4, 3, 3), [5, 3], steps=2, dtype=dtype)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(2, rank_train_steps, spec))


@BACKENDS
def test_under_autocast_bfloat16_input(kernels: str) -> None:
    spec = make_spec((0, 4, 3, 3), [5, 3], dtype=torch.bfloat16, autocast=True)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(2, rank_train_steps, spec))


@BACKENDS
def test_training_forward_under_no_grad_syncs_and_updates_running_stats_once(kernels: str) -> None:
    spec = make_spec((0, 3, 5), [4, 2], steps=2, no_grad=True)
    spec["kernels"] = kernels
    reports = run_on_ranks(2, rank_train_steps, spec)
    check_against_reference(spec, reports)
    for per_rank in reports:  # one all-reduce a step, the first included, with or without gradients
        assert [[c[0] for c in step["forward_calls"]] for step in per_rank] == [["all_reduce"], ["all_reduce"]]


@BACKENDS
def test_input_without_grad_and_frozen_parameters(kernels: str) -> None:
    spec = make_spec((0, 3, 5), [4, 2], input_requires_grad=False)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(2, rank_train_steps, spec))
    spec = make_spec((0, 3, 5), [4, 2], frozen=True)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(2, rank_train_steps, spec))


@BACKENDS
@pytest.mark.parametrize("running_stats", [True, False], ids=["with-running-stats", "without-running-stats"])
def test_eval_mode_is_local_and_silent(running_stats: bool, kernels: str) -> None:
    spec = make_spec((0, 3, 4), [4, 3], mode="eval", layer_kwargs={"track_running_stats": running_stats})
    spec["kernels"] = kernels
    reports = run_on_ranks(2, rank_train_steps, spec)
    for r, per_rank in enumerate(reports):
        # Eval mode never communicates; without running stats each rank uses its own batch.
        assert per_rank[0]["forward_calls"] == [] and per_rank[0]["backward_calls"] == []
        check_against_reference(spec, reports, ranks=[r])


@BACKENDS
def test_process_group_subsets(kernels: str) -> None:
    spec = make_spec((0, 3, 4), [2, 3, 4, 1], steps=2, group_size=2)
    spec["kernels"] = kernels
    reports = run_on_ranks(4, rank_train_steps, spec)
    check_against_reference(spec, reports, ranks=[0, 1])
    check_against_reference(spec, reports, ranks=[2, 3])


@BACKENDS
@pytest.mark.parametrize("world_size", [2, 3, 4], ids=lambda w: f"W{w}")
def test_communication_budget(world_size: int, kernels: str) -> None:
    channels = 6
    spec = make_spec((0, channels, 4), [3] * world_size, steps=3)
    spec["kernels"] = kernels
    for per_rank in run_on_ranks(world_size, rank_train_steps, spec):
        # Every step, the first included: ONE all-reduce of 2C+1 float64 values forward (the count, and per
        # channel the sum and the sum of squares about zero) and one of 2C float32 values backward. The same
        # bytes whatever the world size. (float64 input: tests/test_stateless.py.)
        for step in per_rank:
            assert step["forward_calls"] == [("all_reduce", 2 * channels + 1, (2 * channels + 1) * 8)]
            assert step["backward_calls"] == [("all_reduce", 2 * channels, 2 * channels * 4)]


def rank_global_count_of_one(sizes: list[int], kernels: str) -> dict[str, Any]:
    bn = syncnorm.SyncBatchNorm(3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(sizes[rank()], 3)
    try:
        with use_kernels(kernels):
            bn(x)
    except ValueError as error:
        return {"error": str(error), "unchanged": all(torch.equal(before[k], v) for k, v in bn.state_dict().items())}
    return {"error": None}


@BACKENDS
def test_global_count_of_one_raises_on_every_rank(kernels: str) -> None:
    for per_rank in run_on_ranks(3, rank_global_count_of_one, [0, 1, 0], kernels):
        assert per_rank["error"] is not None
        assert "Expected more than 1 value per channel when training" in per_rank["error"]
        assert per_rank["unchanged"]


@BACKENDS
def test_global_batch_of_two_single_values_is_fine(kernels: str) -> None:
    # One value per channel on each of two ranks is a global batch of 2: no error.
    spec = make_spec((0, 3), [1, 1], steps=2)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(2, rank_train_steps, spec))


@BACKENDS
def test_all_empty_global_batch_leaves_running_stats(kernels: str) -> None:
    spec = make_spec((0, 3, 4), [0, 0], steps=1)
    spec["kernels"] = kernels
    check_against_reference(spec, run_on_ranks(2, rank_train_steps, spec))


def rank_stacked_layers(x: torch.Tensor, dy: torch.Tensor, sizes: list[int], state: dict[str, Any]) -> dict[str, Any]:
    model = _stacked_model()
    model.load_state_dict(state)
    model = syncnorm.convert_model(model)
    xl = my_slice(x, sizes).requires_grad_()
    y = model(xl)
    (y * my_slice(dy, sizes)).sum().backward()
    return {"y": y.detach(), "grad_x": xl.grad, "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}, "calls": COLLECTIVES.names()}


def _stacked_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 6), torch.nn.BatchNorm1d(6),
    )


def test_stacked_layers_in_a_model() -> None:
    torch.manual_seed(0)
    sizes = [3, 2, 4]
    x = torch.randn(sum(sizes), 3, 5, 5) * 3 + 1
    dy = torch.randn(sum(sizes), 6)
    model = _stacked_model()
    state = model.state_dict()
    reports = run_on_ranks(3, rank_stacked_layers, x, dy, sizes, state)
    check_model_against_reference(reports, model, x, dy)
    # Three BatchNorm layers: one all-reduce each forward, three backward (the first layer's input needs a
    # gradient here), nothing else.
    assert all(r["calls"] == ["all_reduce"] * 6 for r in reports)


def rank_ddp_step(x: torch.Tensor, sizes: list[int], state: dict[str, Any]) -> dict[str, Any]:
    model = _conv_bn_model()
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(syncnorm.convert_model(model))
    loss = ddp(my_slice(x, sizes)).square().mean() * (sizes[rank()] / sum(sizes)) * dist.get_world_size()
    loss.backward()
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def _conv_bn_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 3, 1), torch.nn.BatchNorm2d(3))


def test_distributed_data_parallel_gradients_equal_single_process() -> None:
    torch.manual_seed(1)
    sizes = [4, 4]
    x = torch.randn(sum(sizes), 2, 6, 6)
    model = _conv_bn_model()
    state = model.state_dict()
    reports = run_on_ranks(2, rank_ddp_step, x, sizes, state)
    ref = model.double()
    ref(x.double()).square().mean().backward()
    for name, p in ref.named_parameters():
        for r in reports:  # DDP averages the gradients: every rank holds the reference's
            assert_close(r["grads"][name], p.grad, torch.float32, name)
    for name, b in ref.named_buffers():
        for r in reports:
            assert_close(r["buffers"][name], b, torch.float32, name)


@BACKENDS
def test_large_mean_small_spread_is_as_exact_as_float32_allows(kernels: str) -> None:
    """mean 1e4, std 1e-2 float32 data against the float64 reference (see ``_check_large_mean_small_spread``)."""
    _check_large_mean_small_spread(kernels)


def test_large_mean_small_spread_is_as_exact_as_float32_allows_under_compile() -> None:
    """The same bounds for a layer compiled whole with inductor."""
    _check_large_mean_small_spread("native", compile_backend="inductor")


def _check_large_mean_small_spread(kernels: str, compile_backend: Optional[str] = None) -> None:
    """mean 1e4, std 1e-2 float32 data against the float64 reference.

    Statistics: no worse than torch's own float32 BatchNorm on the whole batch (float32 sums of x and
    x^2 would be pure noise). Output and input gradient: within the rounding that float32 arithmetic
    at the magnitude of the kernels' terms allows, 2 * eps32 * max|x| * max|coefficient of x| (the
    fused kernels compute x * a + b with a = weight * invstd, resp. the gradient's x coefficient);
    torch's own float32 BatchNorm has errors of that order too.
    """
    generator = torch.Generator().manual_seed(3)
    sizes = [6, 2, 8]
    x = (1e4 + 1e-2 * torch.randn(sum(sizes), 3, 6, 6, generator=generator, dtype=torch.float64)).float()
    dy = torch.randn(x.shape, generator=generator)
    weight = torch.rand(3, generator=generator) + 0.5
    spec = {"channels": 3, "steps": [{"x": x, "dy": dy, "sizes": sizes}], "weight": weight,
            "bias": torch.randn(3, generator=generator), "layer_kwargs": {}, "kernels": kernels,
            "compile": compile_backend}
    reports = run_on_ranks(3, rank_train_steps, spec)
    if compile_backend:  # compiled whole: no collective ran eagerly, the all-reduce is inside the graph
        assert all(r[0]["forward_calls"] == [] for r in reports)
    reference = reference_step(reference_module(4, 3, {}, spec["weight"], spec["bias"]), x, dy)
    torch_own = reference_step(torch.nn.BatchNorm2d(3), x, dy, torch.float32)  # float32, one process
    for key in ("running_mean", "running_var"):
        ours_error = (reports[0][0][key].double() - reference[key]).abs().max()
        torch_error = (torch_own[key].double() - reference[key]).abs().max()
        assert ours_error <= torch_error, (key, ours_error, torch_error)

    x64, dy64 = x.double(), dy.double()
    dims = (0, 2, 3)
    mean, var = x64.mean(dims, keepdim=True), x64.var(dims, correction=0, keepdim=True)
    invstd = (var + 1e-5).rsqrt()
    scale = weight.double().view(1, -1, 1, 1) * invstd
    mean_dy_xhat = (dy64 * (x64 - mean) * invstd).mean(dims, keepdim=True)
    eps32, max_x = torch.finfo(torch.float32).eps, x64.abs().max()
    bounds = {"y": 2 * eps32 * max_x * scale.abs().max(),
              "grad_x": 2 * eps32 * max_x * (scale * invstd * mean_dy_xhat).abs().max() + 1e-5}
    for key, bound in bounds.items():
        ours_error = (torch.cat([r[0][key] for r in reports]).double() - reference[key]).abs().max()
        assert ours_error <= bound, (key, ours_error, bound)


def rank_checkpointed_step(x: torch.Tensor, dy: torch.Tensor, sizes: list[int], state: dict[str, Any],
                           reentrant: bool) -> dict[str, Any]:
    model = _conv_bn_model()
    model.load_state_dict(state)
    model = syncnorm.convert_model(model)
    xl = my_slice(x, sizes).requires_grad_()
    y = torch.utils.checkpoint.checkpoint(model, xl, use_reentrant=reentrant)
    (y * my_slice(dy, sizes)).sum().backward()
    return {"y": y.detach(), "grad_x": xl.grad, "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_counts_each_batch_once(reentrant: bool) -> None:
    torch.manual_seed(2)
    sizes = [3, 5]
    x = torch.randn(sum(sizes), 2, 6, 6) * 2 + 1
    dy = torch.randn(sum(sizes), 3, 4, 4)
    model = _conv_bn_model()
    reports = run_on_ranks(2, rank_checkpointed_step, x, dy, sizes, model.state_dict(), reentrant)
    check_model_against_reference(reports, model, x, dy)
