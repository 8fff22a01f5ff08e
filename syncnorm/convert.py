"""convert_model / revert_model: make a model's BatchNorm layers synchronised, and back.

How a layer is converted. The layer object itself is kept and only its class changes (the
technique ``torch.nn.utils.parametrize`` uses): parameters, buffers, hooks, ``requires_grad``,
the training flag, device, dtype, extra attributes and every outside reference to the layer (an
optimizer, a list of layers to freeze, a hook handle) stay exactly what they were, and
``state_dict`` keys and values are unchanged.

- An exact ``torch.nn.BatchNorm1d/2d/3d`` or ``torch.nn.SyncBatchNorm`` becomes a
  ``syncnorm.SyncBatchNorm``.
- Any other subclass of BatchNorm (timm's ``BatchNormAct2d``, a user class that overrides
  ``forward``) becomes a generated subclass of its own class, ``Sync<Name>``. Its ``forward`` runs
  the original ``forward`` unchanged, while a ``TorchFunctionMode`` sends the
  ``torch.nn.functional.batch_norm`` calls that belong to this layer to syncnorm's synchronised
  path. So activation, drop layers, input checks and whatever else the subclass does are computed
  exactly as before; only the batch statistics become those of the global batch. Before that
  ``forward`` runs, the generated class does what ``SyncBatchNorm.forward`` does first, with the same
  code (``batchnorm.begin_forward``): validation mode, then the input checks; and in a forward that
  autograd recomputes inside backward (activation checkpointing) it passes no running buffers and puts
  back the subclass's own ``num_batches_tracked`` count, as it does after a failed forward.

Limits of the second mechanism, all of them outside what BatchNorm subclasses in torchvision,
timm or detectron2 do: a call counts as the layer's own when it passes the layer's own
``weight``, ``bias``, ``running_mean`` or ``running_var`` (or, for a layer with none of them, no
such tensors at all); a subclass that normalises with ``torch.batch_norm`` or a custom kernel
instead of ``F.batch_norm`` stays local; the input of the layer's ``forward`` (its first
argument) must be what BatchNorm takes, (N, C, ...) with ``num_features`` channels, since it is
checked before the subclass's code runs; and a subclass of ``torch.nn.SyncBatchNorm`` that calls
``super().forward`` keeps torch's own synchronisation there.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.overrides import TorchFunctionMode

from . import _comm, _validate
from ._function import sync_batch_norm
from .activation import SyncBatchNormAct
from .batchnorm import SyncBatchNorm, SyncNormMixin, is_syncnorm_layer

Exclude = Union[Callable[[str, nn.Module], bool], Iterable[str], None]

# The classes whose forward is plain BatchNorm: they become syncnorm.SyncBatchNorm itself.
_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Instance attributes a conversion may add; revert_model removes those the original lacked.
_SYNC_ATTRS = ("process_group", "layer_name", "last_input_dim", "_syncnorm_original", "_syncnorm_kept",
               "_syncnorm_replaced", "activation", "negative_slope", "alpha", "_syncnorm_fused")
_BY_INPUT_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


def convert_model(
    module: nn.Module, process_group: _comm.GroupOrMesh = None, *, exclude: Exclude = None,
    fuse_activation: bool = False,
) -> nn.Module:
    """Make every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` in ``module`` synchronised.

    Each layer is converted in place, by changing its class: it is the same object afterwards, so
    parameters and buffers are shared, not copied (an optimizer built before the conversion keeps
    updating the converted model), and ``requires_grad``, the training flag, device, dtype, hooks
    and ``state_dict`` are unchanged. Exact BatchNorm classes become ``syncnorm.SyncBatchNorm``;
    subclasses (timm's ``BatchNormAct2d``, your own) become a generated ``Sync<Name>`` subclass
    that runs their own ``forward`` with the batch-norm computation synchronised, so the converted
    model computes what the original computed, with the statistics of the global batch.

    Layers that are not BatchNorm are left alone because their statistics never span samples, so
    a rank's slice of the batch already has everything they need: GroupNorm, LayerNorm and
    InstanceNorm normalise within one sample, and frozen BatchNorms (torchvision's
    ``FrozenBatchNorm2d``) use fixed statistics. (A BatchNorm in ``eval()`` mode is converted, and
    communicates nothing until it trains.) Layers that are already syncnorm layers stay as they are,
    except that an explicit ``process_group`` is applied to them too, as torch's
    ``convert_sync_batchnorm`` does.

    Args:
        module: a model, or a single BatchNorm layer.
        process_group: the ranks whose batches are pooled (default: the whole world; a converted
            ``torch.nn.SyncBatchNorm`` keeps its own group unless this is given): a ProcessGroup or a
            DeviceMesh (``mesh["dp"]``; an N-D mesh pools all of its ranks), resolved here, once. See
            ``syncnorm.new_sync_groups`` for subsets of ranks.
        exclude: layers to leave local: either a collection of qualified module names (as in
            ``model.named_modules()``; a name excludes everything inside that module too) or a
            predicate ``(name, module) -> bool`` called for every module, True excluding it and
            everything inside it.
        fuse_activation: also turn into ``syncnorm.SyncBatchNormAct``, which keeps only its output for
            backward (the docs' memory guide), timm's ``BatchNormAct2d`` layers whose activation is
            invertible (``torch.nn.LeakyReLU`` with a positive slope, ``torch.nn.ELU``, ``torch.nn.Identity``;
            no drop layer, no hooks on the activation), and, inside a ``torch.nn.Sequential``, a
            ``torch.nn.BatchNorm1d/2d/3d`` directly followed by a ``torch.nn.LeakyReLU`` or ``torch.nn.ELU``
            (no forward or backward hooks on either; the activation's place then holds an identity). The
            BatchNorm layer object stays the same; the activation modules are kept for ``revert_model``.
            ``BatchNormAct2d`` layers with other activations (ReLU, SiLU: not invertible) are converted as
            without it, and a warning names them.

    Returns:
        ``module`` itself, converted.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``; ``process_group`` is neither a ProcessGroup
            nor a DeviceMesh, or ``exclude`` is neither a predicate nor a collection of names (str).
        ValueError: a DeviceMesh that does not contain this rank; a name in ``exclude`` is not a module
            of the model (a typo would otherwise leave the layer synchronised silently), or a
            ``LazyBatchNorm`` layer has not yet initialised its parameters (run one forward pass first).

    Warns:
        UserWarning: ``module`` holds no synchronised layer afterwards (no BatchNorm in it, or every one
            excluded): a model with GroupNorm or LayerNorm only needs no conversion, but converting the
            wrong object (a wrapper's inner part, a copy) would otherwise go unnoticed.

    Example:
        >>> model = torchvision.models.resnet18()
        >>> model = syncnorm.convert_model(model, exclude=["layer4"])
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    if not isinstance(module, nn.Module):
        got = f"the class {module.__name__}" if isinstance(module, type) else f"a {type(module).__name__}"
        raise TypeError(
            f"syncnorm.convert_model expected module to be a torch.nn.Module (a model or a BatchNorm layer), got "
            f"{got}; pass the model itself, e.g. model = syncnorm.convert_model(model)."
        )
    is_excluded = _exclusion(module, exclude)
    # On every rank, before anything changes: the group of an N-D DeviceMesh is created collectively.
    process_group = _comm.resolve_group(process_group, "syncnorm.convert_model")
    excluded: list[str] = []
    not_fused: list[str] = []
    # A list first: fusing a layer sets its activation child aside while the walk goes on.
    for name, layer in list(module.named_modules()):
        if any(_inside(name, outer) for outer in excluded):
            continue
        if is_excluded(name, layer):
            excluded.append(name)
        elif fuse_activation and isinstance(layer, nn.Sequential):
            _fuse_sequential(layer, name, process_group, is_excluded)
        elif isinstance(layer, _BatchNorm) and not is_syncnorm_layer(layer):
            fusable = _fusable_activation(layer) if fuse_activation and _is_timm_batchnorm_act(layer) else None
            if fusable is not None:
                _fuse_layer(layer, process_group, name or type(layer).__name__, fusable)
                continue
            if fuse_activation and _is_timm_batchnorm_act(layer):
                not_fused.append(f"{name or type(layer).__name__} ({type(layer._modules.get('act')).__name__})")
            _convert_layer(layer, process_group, name or type(layer).__name__)
        elif is_syncnorm_layer(layer) and process_group is not None:
            layer.process_group = process_group
    if not_fused:
        warnings.warn(
            f"convert_model(fuse_activation=True) left {len(not_fused)} BatchNormAct2d layers unfused (activation not "
            f"invertible, or a drop layer or hooks; synchronised as without fusing): {', '.join(not_fused)}",
            stacklevel=2,
        )
    if not any(is_syncnorm_layer(layer) for layer in module.modules()):
        if any(isinstance(layer, _BatchNorm) for layer in module.modules()):
            because = f"exclude left every BatchNorm layer local (excluded: {', '.join(map(repr, excluded))})"
        else:
            because = "it holds no BatchNorm layer (torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm or a subclass)"
        warnings.warn(
            f"syncnorm.convert_model converted nothing in the {type(module).__name__} it got: {because}. Check that "
            "it is the model you train (a model with GroupNorm or LayerNorm only needs no conversion).",
            UserWarning, stacklevel=2,
        )
    return module


def revert_model(module: nn.Module) -> nn.Module:
    """Turn every syncnorm layer back into the class it had, sharing its parameters and buffers.

    A layer converted by ``convert_model`` gets its original class back (``torch.nn.BatchNorm2d``,
    timm's ``BatchNormAct2d``, ...). A layer built as ``syncnorm.SyncBatchNorm`` becomes
    ``torch.nn.BatchNorm1d``, ``2d`` or ``3d`` after the rank of the last input it saw
    (``BatchNorm2d`` if it never ran). Attributes of its own that the conversion replaced (the
    ``process_group`` of a ``torch.nn.SyncBatchNorm`` converted with another group) get their
    values back. Like the conversion it works in place: the state, hooks and
    flags are untouched, and the result has nothing of syncnorm left, so it runs on one device and
    traces with ``torch.jit.trace`` and ``torch.export``. Subclasses of ``syncnorm.SyncBatchNorm``
    written by users, and ``syncnorm.SyncBatchNormAct`` layers built as such, are left as they are;
    layers that ``convert_model(fuse_activation=True)`` fused get their class and activation module back.

    Args:
        module: a model converted by ``convert_model`` (or holding ``syncnorm.SyncBatchNorm`` layers).

    Returns:
        ``module`` itself, reverted.

    Example:
        >>> model = syncnorm.revert_model(model).eval()
        >>> torch.export.export(model, (torch.randn(1, 3, 224, 224),))
    """
    for layer in list(module.modules()):
        for key, child in layer._modules.items():
            if type(child) is _FusedActivation:  # an existing key gets its module back: the dict keeps its size
                layer._modules[key] = child.__dict__["_syncnorm_activation"]
        if not is_syncnorm_layer(layer):
            continue
        # Layers built as syncnorm classes by the user (a subclass of SyncBatchNorm, a SyncBatchNormAct) stay.
        if type(layer) is SyncBatchNorm or getattr(type(layer), "_syncnorm_generated", False):
            _revert_layer(layer)
        elif type(layer) is SyncBatchNormAct and "_syncnorm_fused" in layer.__dict__:
            layer._modules.update(layer.__dict__["_syncnorm_fused"])  # the activation (and drop) modules back
            _revert_layer(layer)
    return module


def _exclusion(module: nn.Module, exclude: Exclude) -> Callable[[str, nn.Module], bool]:
    """The ``exclude`` argument as a predicate; unknown names are an error, since a typo would sync silently."""
    if exclude is None:
        return lambda name, layer: False
    if callable(exclude):
        return exclude
    names = {exclude} if isinstance(exclude, str) else set(exclude)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(
            "convert_model expected exclude to be a predicate (name, module) -> bool or a collection of module "
            f"names (str), got {exclude!r}."
        )
    known = {name for name, _ in module.named_modules()}
    unknown = sorted(names - known)
    if unknown:
        examples = ", ".join(repr(n) for n in sorted(known - {""})[:6])
        raise ValueError(
            f"convert_model got names in exclude that are not modules of the model: {unknown}. Names are "
            f"those of model.named_modules(), e.g. {examples}."
        )
    return lambda name, layer: name in names


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(outer + ".")


def _is_timm_batchnorm_act(layer: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` itself (its forward is batch_norm -> ``drop`` -> ``act``), not a subclass."""
    cls = type(layer)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.split(".")[0] == "timm"


def _fusable_activation(layer: nn.Module) -> Optional[dict[str, Any]]:
    """``SyncBatchNormAct``'s activation arguments for a timm ``BatchNormAct2d``, or None when it cannot be fused.

    Fused only when nothing but the activation runs after the normalisation and nothing watches it: no drop
    layer, no other child module, no hooks on the activation (the fused layer would skip them).
    """
    children = layer._modules
    act, drop = children.get("act"), children.get("drop")
    if set(children) - {"act", "drop"} or (drop is not None and type(drop) is not nn.Identity) or act is None:
        return None
    return _activation_arguments(act)


def _hooked(module: nn.Module) -> bool:
    """Whether a hook watches ``module``'s output or gradients (a fused layer would change what it sees)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _activation_arguments(act: nn.Module) -> Optional[dict[str, Any]]:
    """``SyncBatchNormAct``'s arguments for an activation module, or None when it is not invertible or hooked."""
    if _hooked(act):
        return None
    if type(act) is nn.LeakyReLU and act.negative_slope > 0:
        return {"activation": "leaky_relu", "negative_slope": float(act.negative_slope), "alpha": 1.0}
    if type(act) is nn.ELU and act.alpha > 0:
        return {"activation": "elu", "negative_slope": 0.01, "alpha": float(act.alpha)}
    if type(act) is nn.Identity:
        return {"activation": "identity", "negative_slope": 0.01, "alpha": 1.0}
    return None


def _fuse_layer(layer: _BatchNorm, process_group: Optional[_comm.ProcessGroup], name: str,
                activation: dict[str, Any]) -> None:
    """Make ``layer`` a ``SyncBatchNormAct`` in place; its activation and drop modules wait for ``revert_model``."""
    state = vars(layer)
    kept = tuple(attr for attr in _SYNC_ATTRS if attr in state)
    state["_syncnorm_replaced"] = {attr: state[attr] for attr in kept}
    state["_syncnorm_kept"] = kept
    state["_syncnorm_original"] = type(layer)
    state["_syncnorm_fused"] = {child: layer._modules.pop(child) for child in list(layer._modules)}
    if process_group is not None or "process_group" not in state:  # torch's SyncBatchNorm keeps its own group
        state["process_group"] = process_group
    state["layer_name"] = name
    state.update(activation)
    layer.__class__ = SyncBatchNormAct


def _convert_layer(layer: _BatchNorm, process_group: Optional[_comm.ProcessGroup], name: str) -> None:
    if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
        raise ValueError(
            f"convert_model cannot convert '{name}' ({type(layer).__name__}): its parameters are not "
            "initialised yet. Run one forward pass (or build the model with BatchNorm instead of LazyBatchNorm) "
            "before converting."
        )
    original = type(layer)
    state = vars(layer)
    kept = tuple(attr for attr in _SYNC_ATTRS if attr in state)
    # The layer's own values of the attributes a conversion sets (torch.nn.SyncBatchNorm's process_group),
    # for revert_model.
    state["_syncnorm_replaced"] = {attr: state[attr] for attr in kept}
    if process_group is not None or "process_group" not in state:
        state["process_group"] = process_group
    state["layer_name"] = name
    state["_syncnorm_kept"] = kept
    if original in _PLAIN:
        state["_syncnorm_original"] = original
        state.setdefault("last_input_dim", None)
        layer.__class__ = SyncBatchNorm
    else:
        layer.__class__ = _synchronised_class(original)


class _FusedActivation(nn.Identity):
    """The place of an activation that ``convert_model(fuse_activation=True)`` fused into the BatchNorm before it.

    The activation module itself waits here (not as a child) for ``revert_model``, which puts it back.
    """

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.__dict__["_syncnorm_activation"] = activation

    def extra_repr(self) -> str:
        return f"fused into the previous layer: {self.__dict__['_syncnorm_activation']}"


def _fuse_sequential(sequence: nn.Sequential, prefix: str, process_group: Optional[_comm.ProcessGroup],
                     is_excluded: Callable[[str, nn.Module], bool]) -> None:
    """Fuse every BatchNorm -> invertible activation pair of ``sequence``'s children (the output flows nowhere else)."""
    keys = list(sequence._modules)
    for first, second in zip(keys, keys[1:]):
        norm, act = sequence._modules[first], sequence._modules[second]
        if not isinstance(norm, _BatchNorm) or act is None or type(norm) not in _PLAIN or _hooked(norm):
            continue
        if isinstance(norm, LazyModuleMixin) and norm.has_uninitialized_params():
            continue  # left to the usual conversion, which says what to do
        arguments = _activation_arguments(act)
        names = [f"{prefix}.{key}" if prefix else key for key in (first, second)]
        if arguments is None or is_excluded(names[0], norm) or is_excluded(names[1], act):
            continue
        _fuse_layer(norm, process_group, names[0], arguments)
        sequence._modules[second] = _FusedActivation(act)


def _revert_layer(layer: nn.Module) -> None:
    original = layer.__dict__.get("_syncnorm_original") or getattr(type(layer), "_syncnorm_original", None)
    if original is None:
        original = _BY_INPUT_DIM.get(layer.__dict__.get("last_input_dim") or 4, nn.BatchNorm2d)
    kept = layer.__dict__.get("_syncnorm_kept", ())
    replaced = layer.__dict__.get("_syncnorm_replaced", {})
    for attr in _SYNC_ATTRS:
        if attr in layer.__dict__ and attr not in kept:
            delattr(layer, attr)
    layer.__dict__.update(replaced)
    layer.__class__ = original


# One generated class per original class, so that every converted layer of a class has the same
# type (``type(a) is type(b)`` and pickling keep working). Never invalid: classes do not change.
_SYNCHRONISED: dict[type[_BatchNorm], type[_BatchNorm]] = {}


def _synchronised_class(original: type[_BatchNorm]) -> type[_BatchNorm]:
    """``Sync<Name>``: ``original`` with its batch-norm computation synchronised (cached)."""
    if original not in _SYNCHRONISED:
        _SYNCHRONISED[original] = _make_synchronised_class(original)
    return _SYNCHRONISED[original]


def _make_synchronised_class(original: type[_BatchNorm]) -> type[_BatchNorm]:
    input_name = _first_parameter(original.forward)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        # What SyncBatchNorm.forward does first, before the subclass's own code can change anything:
        # validation mode (in eval mode too), then the input checks, on every rank.
        input = args[0] if args else kwargs.get(input_name) if input_name else None
        description, validating, group, recomputing = self._begin_step(input)
        if not self.training:
            return original.forward(self, *args, **kwargs)
        # The subclass may count the batch itself (timm's BatchNormAct2d does, before F.batch_norm): a
        # recomputed forward (activation checkpointing) or a failed one must leave that count as it was.
        counted = self.num_batches_tracked if isinstance(self.num_batches_tracked, Tensor) else None
        saved = None if counted is None else counted.clone()
        try:
            with _RouteBatchNorm(self, group, description, validating=validating, recomputing=recomputing):
                output = original.forward(self, *args, **kwargs)
        except BaseException:
            _restore(counted, saved)
            raise
        if recomputing:
            _restore(counted, saved)
        return output

    def __reduce_ex__(self: _BatchNorm, protocol: Any) -> Any:
        # The generated class cannot be found by name in another process: rebuild it from the original.
        return (_new_synchronised, (original,), dict(self.__dict__))

    forward.__doc__ = f"{original.__name__}.forward with the statistics of the batch of every rank."
    namespace = {
        "forward": forward,
        "__reduce_ex__": __reduce_ex__,
        "__module__": __name__,
        "__qualname__": f"Sync{original.__qualname__}",
        "__doc__": f"{original.__name__} converted by syncnorm.convert_model: global-batch statistics.",
        "_KIND": f"syncnorm-converted Sync{original.__name__}",
        "_syncnorm_generated": True,
        "_syncnorm_original": original,
    }
    # SyncNormMixin first: its members are the syncnorm layer's; it defines no forward, so the subclass's runs.
    return type(f"Sync{original.__name__}", (SyncNormMixin, original), namespace)


def _first_parameter(forward: Callable[..., Any]) -> Optional[str]:
    """The name of ``forward``'s input parameter (the one after ``self``), if it has one."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: the input must then come positionally
        return None
    return parameters[0].name if parameters else None


def _restore(counted: Optional[Tensor], saved: Optional[Tensor]) -> None:
    if counted is not None and saved is not None:
        with torch.no_grad():
            counted.copy_(saved)


def _new_synchronised(original: type[_BatchNorm]) -> nn.Module:
    """An empty instance of ``Sync<original>``, for pickle and ``copy.deepcopy``."""
    cls = _synchronised_class(original)
    instance: nn.Module = cls.__new__(cls)
    return instance


class _RouteBatchNorm(TorchFunctionMode):
    """Sends the training ``F.batch_norm`` calls of one layer, made while it is active, to ``sync_batch_norm``.

    ``group`` may be None (one process, or a group of one rank): the call is then plain batch_norm,
    still without updating anything in a recomputed forward, as ``SyncBatchNorm``.
    """

    def __init__(self, layer: _BatchNorm, group: Optional[_comm.ProcessGroup], description: str, *,
                 validating: bool, recomputing: bool) -> None:
        super().__init__()
        self.layer = layer
        self.group = group
        self.description = description
        self.validating = validating
        self.recomputing = recomputing

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Optional[dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            call.apply_defaults()
            arguments = call.arguments
            if arguments["training"] and self._owns(arguments):
                if self.recomputing:  # this batch was counted in the first forward
                    arguments["running_mean"] = arguments["running_var"] = None
                output = sync_batch_norm(**arguments, group=self.group, layer=self.description)
                if self.validating and self.group is not None:
                    _validate.check_backward(self.layer, output, arguments["input"], self.description)
                return output
        return func(*args, **kwargs)

    def _owns(self, arguments: dict[str, Any]) -> bool:
        """Whether a batch_norm call normalises with this layer's own tensors (and so is this layer's)."""
        names = ("running_mean", "running_var", "weight", "bias")
        mine = [getattr(self.layer, name) for name in names]
        given = [arguments[name] for name in names]
        if all(t is None for t in mine):
            return all(t is None for t in given)
        return any(isinstance(t, Tensor) and t is m for t, m in zip(given, mine))

