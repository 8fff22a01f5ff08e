"""``syncnorm.joinable``: ranks with different numbers of batches, under ``torch.distributed.algorithms.Join``.

A rank that has run out of batches leaves its training loop and waits in ``Join.__exit__``; at every
step the other ranks still take, Join calls each joinable's ``main_hook`` once. Every synchronised
training forward and backward is collective, so the rank that ran out must take part in each of
them, in the same order, with nothing of its own: this joinable's hook runs every syncnorm layer's
own training forward on an EMPTY batch (shape ``(0, C, ...)``), in the order the layers ran in this
rank's last step, and then their backward, in reverse. An empty batch adds zero to every count and
sum, so the statistics, the running statistics and ``num_batches_tracked`` come out on the joined
rank exactly as on the others: every rank ends the epoch with the same layers.

Ordering with DistributedDataParallel. DDP's own join hook shadows its gradient all-reduces and waits
for them; the active ranks issue those only in backward, after their syncnorm forwards, which wait
for the joined rank. So syncnorm's hook must come first (``Join([syncnorm.joinable(ddp_model),
ddp_model])``) and run its empty step in a thread of its own while DDP's hook runs; the syncnorm
layers must not share DDP's communicator (``joinable`` gives layers on the default group a dedicated
group of the same ranks); and DDP must not broadcast buffers in forward (``forward_sync_buffers=False``,
``broadcast_buffers=False`` on a torch without it), which would read them while the empty step updates
them (syncnorm keeps the buffers identical on every rank anyway).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn.modules.batchnorm import _BatchNorm

from . import _comm
from .batchnorm import SyncBatchNorm, _inside_backward

_WHO = "syncnorm.joinable"


@dataclass
class _Call:
    """One synchronised training forward of a layer in a step: what its empty stand-in must look like."""

    layer: _BatchNorm
    dim: int
    dtype: torch.dtype
    device: torch.device
    input_requires_grad: bool
    output_requires_grad: bool


class _SyncNormJoinable(Joinable):
    """The ``Joinable`` that ``syncnorm.joinable`` returns (see there)."""

    def __init__(self, model: nn.Module, layers: list[_BatchNorm], group: Any, device: torch.device) -> None:
        super().__init__()
        self.layers = layers
        self._group = group
        self._device = device
        # The synchronised forwards of this rank's last step, in order (the collectives to shadow once joined).
        self.last_step: list[_Call] = []
        self._step: list[_Call] = []
        self.shadowing = False
        # Inside a Join context (from its construction to its post-hooks, which every rank runs at its end);
        # Join leaves _join_config enabled after the context, where a notification would be a stray collective.
        self.active = False
        self._handles = [model.register_forward_pre_hook(self._step_starts)]
        self._handles += [layer.register_forward_hook(self._record) for layer in layers]

    def _step_starts(self, module: nn.Module, args: Any) -> None:
        if not (self.active and self._join_config.enable):  # outside a Join context: nothing to do
            return
        if not self._join_config.is_first_joinable:
            # Every rank's first forward in the context raises here, together: no rank is left waiting.
            raise RuntimeError(
                f"{_WHO}(model) must come first in Join([...]), before DistributedDataParallel: DDP's join hook "
                "waits for gradient all-reduces that the other ranks issue only after their syncnorm forwards, "
                "which wait for this rank. Use Join([syncnorm.joinable(ddp_model), ddp_model])."
            )
        work = Join.notify_join_context(self)
        if work is not None and isinstance(module, nn.parallel.DistributedDataParallel):
            # What DDP does with its own notification when it is first: its reducer reads the number of ranks
            # still active from it (Join(..., divide_by_initial_world_size=False) divides gradients by that).
            module.reducer._set_forward_pass_work_handle(work, module._divide_by_initial_world_size)
        if self._step:
            self.last_step = self._step
        self._step = []

    def _record(self, layer: nn.Module, args: Any, output: Any) -> None:
        if not (self.active and layer.training) or self.shadowing:
            return
        if _inside_backward():
            # Every rank recomputes at the same point of its first backward: all raise here, together.
            raise RuntimeError(
                f"{_WHO}: activation checkpointing recomputes syncnorm forwards inside backward, and a rank that "
                "has run out of batches cannot replay them; under Join, leave the syncnorm layers out of "
                "checkpointed regions."
            )
        x = args[0] if args else None
        if isinstance(layer, _BatchNorm) and isinstance(x, Tensor) and isinstance(output, Tensor):
            self._step.append(_Call(layer, x.dim(), x.dtype, x.device, x.requires_grad, output.requires_grad))

    def join_hook(self, **kwargs: Any) -> JoinHook:
        self.active, self.last_step, self._step = True, [], []
        return _ShadowSteps(self)

    @property
    def join_device(self) -> torch.device:
        return self._device

    @property
    def join_process_group(self) -> Any:
        return self._group

    def remove(self) -> None:
        """Remove the hooks this joinable put on the model and its layers."""
        for handle in self._handles:
            handle.remove()


class _ShadowSteps(JoinHook):
    """On a rank that ran out of batches: one step of every syncnorm layer on an empty batch, per main_hook.

    The step runs in a thread of its own, while this thread goes on to DDP's join hook: the other ranks issue
    DDP's blocking collectives (the bucket-order broadcast of their second step) before their
    syncnorm forwards, and their gradient all-reduces after them, so neither order can be followed serially.
    Each thread uses only the syncnorm layers' groups; it is joined before the next step and after the last.
    """

    def __init__(self, joinable: _SyncNormJoinable) -> None:
        self.joinable = joinable
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def main_hook(self) -> None:
        self._finish()
        joinable = self.joinable
        if joinable._step:  # the rank's last real step, if it had one since the context began
            joinable.last_step, joinable._step = joinable._step, []
        calls = joinable.last_step or [_default_call(layer, joinable.join_device) for layer in joinable.layers]
        self.thread = threading.Thread(target=self._run, args=(calls,), name="syncnorm-join", daemon=True)
        self.thread.start()

    def post_hook(self, is_last_joiner: bool) -> None:
        self.joinable.active = False
        self._finish()

    def _finish(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self, calls: list[_Call]) -> None:
        joinable = self.joinable
        grads = [(p, p.grad) for layer in joinable.layers for p in layer.parameters(recurse=False)]
        joinable.shadowing = True
        try:
            _shadow(calls)
        except BaseException as error:  # raised in the Join context's thread, at the next hook
            self.error = error
        finally:
            joinable.shadowing = False
            for p, grad in grads:  # the empty batches' parameter gradients are zeros: leave the rank's as they were
                p.grad = grad


def _shadow(calls: list[_Call]) -> None:
    """Every recorded forward on an empty batch, then their backward all-reduces in the order autograd ran them."""
    outputs = []
    with torch.enable_grad():
        for call in calls:
            shape = (0, call.layer.num_features) + (1,) * (call.dim - 2)
            empty = torch.empty(shape, dtype=call.dtype, device=call.device, requires_grad=call.input_requires_grad)
            outputs.append((call, call.layer(empty)))
        for call, output in reversed(outputs):  # last forward first
            if call.output_requires_grad and output.requires_grad:
                torch.autograd.backward(output, torch.zeros_like(output))


def _default_call(layer: _BatchNorm, device: torch.device) -> _Call:
    """A rank that joined before its first step: the layers in registration order, inputs needing gradients.

    (A layer whose input needs no gradient, on the model's raw input, takes no backward all-reduce on the
    other ranks: such a model needs a first step on every rank, which records the real calls.)
    """
    # The class it was converted from, or for a generated Sync<Name> class its own original (a subclass of
    # BatchNorm1d refuses 4-D input in its own forward); a layer built as SyncBatchNorm takes any.
    original: Any = getattr(layer, "_syncnorm_original", None)
    dim = 4
    if isinstance(original, type):
        dim = 3 if issubclass(original, nn.BatchNorm1d) else 5 if issubclass(original, nn.BatchNorm3d) else 4
    weight = getattr(layer, "weight", None)
    dtype = weight.dtype if isinstance(weight, Tensor) else torch.float32
    return _Call(layer, dim, dtype, device, True, isinstance(weight, Tensor) and weight.requires_grad)


def joinable(model: nn.Module) -> Joinable:
    """A ``torch.distributed.algorithms.Joinable`` for ranks that run out of batches before the others.

    Inside ``Join``, a rank whose loop has ended takes part in every synchronised forward and backward
    the other ranks still run, with an empty batch: each step's statistics are exactly those of the
    batches that exist at that step, and at the end of the context every rank holds the same running
    statistics and ``num_batches_tracked``. Pass it FIRST, before DistributedDataParallel, and build DDP
    with ``forward_sync_buffers=False`` (``broadcast_buffers=False`` on a torch without it).

    Call it on every rank, after ``convert_model`` and the DDP wrap, before the loop: syncnorm layers on
    the default group (the one DDP uses) get a dedicated group of the same ranks (created here, a
    collective), so that their all-reduces never pair with DDP's. One forward per step; not with
    activation checkpointing around syncnorm layers (its recomputed forwards cannot be replayed); with
    DDP, gradients averaged over the initial world size (DDP's default for Join) or, with
    ``Join(..., divide_by_initial_world_size=False)``, over the ranks still active.

    Args:
        model: the model called in the loop (the DDP-wrapped one), holding syncnorm layers.

    Returns:
        A ``Joinable`` to pass to ``Join`` before the DDP model; ``.remove()`` takes its hooks off.

    Raises:
        ValueError: ``model`` has no syncnorm layer, or is a DistributedDataParallel that broadcasts
            buffers; ``torch.distributed`` is not initialised.
        RuntimeError: at the first forward inside ``Join``, on every rank, if it is not first in the list; at
            the first backward, on every rank, if it recomputes a syncnorm forward (activation checkpointing).

    Example:
        >>> ddp = DistributedDataParallel(syncnorm.convert_model(model), forward_sync_buffers=False)
        >>> with Join([syncnorm.joinable(ddp), ddp]):
        ...     for x, y in loader:  # ranks may hold different numbers of batches
        ...         loss_fn(ddp(x), y).backward(); optimizer.step(); optimizer.zero_grad()
    """
    if not _comm.distributed_ready():
        raise ValueError(f"{_WHO} needs torch.distributed.init_process_group() to have run first.")
    layers = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and (isinstance(m, SyncBatchNorm) or getattr(type(m), "_syncnorm_generated",
                                                                                         False))]
    if not layers:
        raise ValueError(
            f"{_WHO} found no syncnorm layer in {type(model).__name__}; convert the model first "
            "(syncnorm.convert_model(model)), or leave it out of Join."
        )
    group: Any = dist.group.WORLD
    if isinstance(model, nn.parallel.DistributedDataParallel):
        group = model.process_group
        if getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", False)):
            raise ValueError(
                f"{_WHO} needs DistributedDataParallel(..., forward_sync_buffers=False) (broadcast_buffers=False on "
                "a torch without it): a rank that has run out of batches updates its syncnorm buffers while DDP "
                "would broadcast them (syncnorm keeps them identical on every rank anyway)."
            )
    world = dist.group.WORLD
    for layer in layers:
        if layer.process_group is None or layer.process_group is world:
            layer.process_group = _comm.dedicated_group(world)
        elif layer.process_group is group:
            raise ValueError(
                f"{_WHO}: a syncnorm layer synchronises over DistributedDataParallel's process group; give the "
                "layers a group of their own (convert_model(model, process_group=...)), so that their all-reduces "
                "never pair with DDP's."
            )
    return _SyncNormJoinable(model, layers, group, _device(layers))


def _device(layers: list[_BatchNorm]) -> torch.device:
    for layer in layers:
        for t in list(layer.parameters()) + list(layer.buffers()):
            return t.device
    return torch.device("cpu")
