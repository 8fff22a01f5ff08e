"""convert_model / revert_model on small models: what is kept, what is converted, and subclasses on Gloo ranks.

The real architectures (torchvision, timm) are in test_models.py.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import COLLECTIVES, my_slice, run_on_ranks
from reference import assert_close, check_model_against_reference
from timm.layers.norm_act import BatchNormAct2d
from torch import nn
from torch.nn.functional import batch_norm as imported_batch_norm
from torchvision.ops.misc import FrozenBatchNorm2d

import syncnorm
from syncnorm.batchnorm import SyncNormMixin


class ShiftedBatchNorm2d(nn.BatchNorm2d):
    """A user subclass that overrides forward: its own momentum rule, then an extra shift and scale."""

    def __init__(self, num_features: int, shift: float) -> None:
        super().__init__(num_features, momentum=0.25)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called through a name imported from torch.nn.functional, not as F.batch_norm.
        y = imported_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, 0.5 * self.momentum, self.eps)
        return 2 * y + self.shift


class TwiceBatchNorm1d(nn.BatchNorm1d):
    """A subclass that calls super().forward and post-processes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).tanh()


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), BatchNormAct2d(5, act_layer=nn.SiLU),
        nn.Conv2d(5, 6, 1), ShiftedBatchNorm2d(6, shift=0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 7), TwiceBatchNorm1d(7), nn.BatchNorm1d(7),
    )


def every_kind_of_layer() -> nn.Module:
    return nn.ModuleDict({
        "bn1": nn.BatchNorm1d(3), "bn2": nn.BatchNorm2d(3), "bn3": nn.BatchNorm3d(3), "torch_sync": nn.SyncBatchNorm(3),
        "group": nn.GroupNorm(1, 3), "layer": nn.LayerNorm(3), "instance": nn.InstanceNorm2d(3, affine=True),
        "frozen": FrozenBatchNorm2d(3), "act": BatchNormAct2d(3), "shifted": ShiftedBatchNorm2d(3, 0.0),
    })


def test_plain_batchnorm_layers_become_syncbatchnorm_in_place() -> None:
    model = every_kind_of_layer()
    layers = dict(model.named_children())
    assert syncnorm.convert_model(model) is model
    for name in ("bn1", "bn2", "bn3", "torch_sync"):
        assert type(model[name]) is syncnorm.SyncBatchNorm and model[name] is layers[name]
        assert model[name].layer_name == name


def test_non_batchnorm_layers_are_left_alone() -> None:
    model = syncnorm.convert_model(every_kind_of_layer())
    expected = {"group": nn.GroupNorm, "layer": nn.LayerNorm, "instance": nn.InstanceNorm2d,
                "frozen": FrozenBatchNorm2d}
    for name, cls in expected.items():
        assert type(model[name]) is cls


def test_subclasses_become_generated_synchronised_subclasses() -> None:
    model = syncnorm.convert_model(every_kind_of_layer())
    for name, cls in (("act", BatchNormAct2d), ("shifted", ShiftedBatchNorm2d)):
        layer = model[name]
        # The user's class and syncnorm's mixin (the membership mark, the step's beginning), nothing else.
        assert type(layer).__name__ == f"Sync{cls.__name__}" and type(layer).__bases__ == (SyncNormMixin, cls)
        assert isinstance(layer, cls) and layer.layer_name == name
    # One class per original class: two converted layers of a class share it.
    twin = syncnorm.convert_model(BatchNormAct2d(3))
    assert type(twin) is type(model["act"])


def test_state_dict_keys_and_values_identical_and_tensors_shared() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    model(torch.randn(4, 3, 5, 5))  # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    syncnorm.convert_model(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in after.items():
        assert torch.equal(value, before[key]), key
        assert value.data_ptr() == pointers[key], f"{key} was copied, not shared"


def test_optimizer_built_before_conversion_updates_converted_model() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    syncnorm.convert_model(model)
    x = torch.randn(4, 3, 5, 5)
    for net, opt in ((model, optimizer), (reference, torch.optim.SGD(reference.parameters(), lr=0.5))):
        net(x).square().mean().backward()
        opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(model[1].weight, small_cnn()[1].weight)  # the step did change it


def test_flags_dtype_and_hooks_are_kept() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3), nn.BatchNorm1d(2, dtype=torch.float64))
    model[0].weight.requires_grad_(False)
    model[1].eval()
    fired: list[str] = []
    model[0].register_forward_pre_hook(lambda m, args: fired.append("pre"))
    model[1].register_forward_hook(lambda m, args, out: fired.append("post"))
    model[1].register_full_backward_hook(lambda m, gin, gout: fired.append("backward"))
    syncnorm.convert_model(model)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert model[0].training and not model[1].training
    assert model[2].weight.dtype == torch.float64 and model[2].running_mean.dtype == torch.float64
    model[1](model[0](torch.randn(2, 3, 4, 4))).sum().backward()
    assert fired == ["pre", "post", "backward"]


def test_subclasses_compute_what_they_computed_in_one_process() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    reference = copy.deepcopy(model)
    syncnorm.convert_model(model)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(model(x), reference(x))
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, c), name


@pytest.mark.parametrize("style", ["names", "predicate"])
def test_exclude_leaves_layers_and_everything_inside_local(style: str) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3)), nn.BatchNorm1d(3))
    exclude: Any = ["1", "2"] if style == "names" else (lambda name, m: name == "1" or isinstance(m, nn.BatchNorm1d))
    syncnorm.convert_model(model, exclude=exclude)
    assert type(model[0]) is syncnorm.SyncBatchNorm
    assert type(model[1][0]) is nn.BatchNorm2d and type(model[1][1]) is BatchNormAct2d
    assert type(model[2]) is nn.BatchNorm1d


def test_exclude_with_unknown_name_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"not modules of the model: \['2'\].*e\.g\. '0', '1'"):
        syncnorm.convert_model(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), exclude=["2"])


def test_uninitialised_lazy_batchnorm_is_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match="Run one forward pass"):
        syncnorm.convert_model(nn.Sequential(nn.LazyBatchNorm2d()))


@pytest.mark.parametrize(
    ("model", "because"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm(2)),
         "in the Sequential it got: it holds no BatchNorm layer"),
        (FrozenBatchNorm2d(3), "in the FrozenBatchNorm2d it got: it holds no BatchNorm layer"),
    ],
    ids=["groupnorm_model", "frozen_batchnorm"],
)
def test_a_model_without_batchnorm_is_left_as_it_is_with_a_warning(model: nn.Module, because: str) -> None:
    before = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="syncnorm.convert_model converted nothing " + because) as record:
        assert syncnorm.convert_model(model) is model
    assert len(record) == 1 and record[0].filename == __file__  # stacklevel: the caller's line
    assert repr(model) == repr(before)


def test_excluding_every_batchnorm_warns_with_the_names_excluded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.BatchNorm2d(3)), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match=r"exclude left every BatchNorm layer local \(excluded: '1', '2'\)"):
        syncnorm.convert_model(model, exclude=["1", "2"])
    assert type(model[1][0]) is nn.BatchNorm2d and type(model[2]) is nn.BatchNorm1d


@pytest.mark.parametrize("twice", [False, True], ids=["first_conversion", "already_converted"])
def test_a_model_with_batchnorm_converts_without_a_warning(twice: bool) -> None:
    model = small_cnn()
    if twice:
        syncnorm.convert_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncnorm.convert_model(model)
    assert type(model[1]) is syncnorm.SyncBatchNorm


@pytest.mark.parametrize(
    ("argument", "got"),
    [
        (lambda: small_cnn().parameters(), "got a generator"),
        (lambda: [nn.BatchNorm2d(3)], "got a list"),
        (lambda: nn.BatchNorm2d, "got the class BatchNorm2d"),
        (lambda: None, "got a NoneType"),
    ],
    ids=["parameters", "list_of_layers", "class_not_instance", "none"],
)
def test_a_non_module_is_a_type_error_naming_the_argument(argument: Any, got: str) -> None:
    with pytest.raises(TypeError, match=r"syncnorm.convert_model expected module to be a torch.nn.Module \(a model or "
                                        rf"a BatchNorm layer\), {got}; pass the model itself"):
        syncnorm.convert_model(argument())


def test_process_group_of_torch_syncbatchnorm_is_kept_unless_given() -> None:
    marker = object()
    layer = nn.SyncBatchNorm(3, process_group=marker)
    assert syncnorm.convert_model(layer).process_group is marker
    other = dist.ProcessGroup(dist.HashStore(), 0, 1)  # a group of one process, without init_process_group
    assert syncnorm.convert_model(nn.BatchNorm2d(3), process_group=other).process_group is other


def test_convert_sync_batchnorm_alias_converts_subclasses_too() -> None:
    model = small_cnn()
    syncnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is syncnorm.SyncBatchNorm and type(model[4]).__name__ == "SyncBatchNormAct2d"


def test_revert_model_restores_original_classes_and_state() -> None:
    torch.manual_seed(0)
    model = every_kind_of_layer()
    classes = {name: type(m) for name, m in model.named_modules()}
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    state = model.state_dict()
    syncnorm.revert_model(syncnorm.convert_model(model))
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    assert model["torch_sync"].process_group is None  # torch's own attribute is kept
    for key, value in model.state_dict().items():
        assert value is state[key] or value.data_ptr() == state[key].data_ptr(), key


@pytest.mark.parametrize("shape, expected", [((4, 3), nn.BatchNorm1d), ((4, 3, 5), nn.BatchNorm1d),
                                             ((4, 3, 2, 2), nn.BatchNorm2d), ((4, 3, 2, 2, 2), nn.BatchNorm3d),
                                             (None, nn.BatchNorm2d)], ids=["NC", "NCL", "NCHW", "NCDHW", "never-ran"])
def test_revert_of_a_built_syncbatchnorm_follows_its_last_input(shape: Any, expected: type) -> None:
    layer = syncnorm.SyncBatchNorm(3)
    if shape is not None:
        layer(torch.randn(shape))
    assert type(syncnorm.revert_model(layer)) is expected
    assert not hasattr(layer, "process_group") and not hasattr(layer, "layer_name")


def test_converted_subclass_survives_deepcopy_and_pickle() -> None:
    model = syncnorm.convert_model(small_cnn())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for copied in (copy.deepcopy(model), loaded, pickle.loads(pickle.dumps(model))):
        assert [type(m) for m in copied.modules()] == [type(m) for m in model.modules()]
        assert copied[4].layer_name == "4"
        x = torch.randn(2, 3, 4, 4)
        assert torch.equal(copied.eval()(x), model.eval()(x))


def test_reverted_small_cnn_traces_and_exports() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    model(torch.randn(4, 3, 5, 5))
    syncnorm.convert_model(model)
    model(torch.randn(4, 3, 5, 5))
    model = syncnorm.revert_model(model).eval()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    traced = torch.jit.trace(model, (torch.randn(2, 3, 5, 5),))
    exported = torch.export.export(model, (torch.randn(2, 3, 5, 5),))  # static shapes: same batch size
    torch.testing.assert_close(traced(x), expected)
    torch.testing.assert_close(exported.module()(x), expected)


def rank_subclass_step(x: torch.Tensor, dy: torch.Tensor, sizes: list[int], state: dict[str, Any]) -> dict[str, Any]:
    model = small_cnn()
    model.load_state_dict(state)
    syncnorm.convert_model(model)
    xl = my_slice(x, sizes).requires_grad_()
    COLLECTIVES.reset()
    y = model(xl)
    (y * my_slice(dy, sizes)).sum().backward()
    return {"y": y.detach(), "grad_x": xl.grad, "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}, "calls": COLLECTIVES.names()}


def test_converted_subclasses_match_single_process_on_two_ranks() -> None:
    torch.manual_seed(0)
    sizes = [3, 2]
    x = torch.randn(sum(sizes), 3, 5, 5) * 2 + 1
    dy = torch.randn(sum(sizes), 7)
    model = small_cnn()
    reports = run_on_ranks(2, rank_subclass_step, x, dy, sizes, model.state_dict())
    check_model_against_reference(reports, model, x, dy)
    # Five BatchNorm layers, plain and subclassed: one all-reduce forward and one backward each, nothing else.
    assert all(r["calls"] == ["all_reduce"] * 10 for r in reports)


def rank_excluded_layer_stays_local(x: torch.Tensor, sizes: list[int]) -> dict[str, Any]:
    model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3))
    syncnorm.convert_model(model, exclude=["1"])
    COLLECTIVES.reset()
    with torch.no_grad():
        y = model(my_slice(x, sizes))
    return {"y": y, "calls": COLLECTIVES.names()}


def test_excluded_layer_normalises_with_the_local_batch_on_ranks() -> None:
    torch.manual_seed(0)
    sizes = [3, 2]
    x = torch.randn(sum(sizes), 3, 4, 4) + 3
    reports = run_on_ranks(2, rank_excluded_layer_stays_local, x, sizes)
    first = F.batch_norm(x.double(), None, None, training=True)  # synchronised: the whole batch
    for r, part in zip(reports, first.split(sizes)):
        expected = F.batch_norm(part, None, None, training=True).relu()  # local: this rank's part
        assert_close(r["y"], expected, torch.float32, "excluded layer output")
        assert r["calls"] == ["all_reduce"]  # the synchronised layer's one forward all-reduce


def rank_error_names_the_layer(sizes: list[int]) -> str:
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Sequential(nn.Identity(), BatchNormAct2d(3)))
    syncnorm.convert_model(model)
    try:
        model(torch.randn(sizes[torch.distributed.get_rank()], 2, 1, 1))
    except ValueError as error:
        return str(error)
    return "no error"


def test_error_in_a_converted_subclass_names_the_layer() -> None:
    # One value per channel over both ranks together: torch's error, on every rank, naming '1.1'.
    messages = run_on_ranks(2, rank_error_names_the_layer, [1, 0])
    for message in messages:
        assert "Expected more than 1 value per channel" in message and "SyncBatchNormAct2d '1.1'" in message
