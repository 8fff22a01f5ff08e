"""``syncnorm.joinable``: ranks with different numbers of batches, under ``torch.distributed.algorithms.Join``.

A rank that has run out of batches leaves its training loop and waits in ``Join.__exit__``; at every
step the other ranks still take, Join calls each joinable's ``main_hook`` once. Every synchronised
training forward and backward is collective, so the rank that ran out must take part in each of
them, in the same order, with nothing of its own: this joinable's hook runs every syncnorm layer's
own training forward on an EMPTY batch (shape ``(0, C, ...)``), in the order the layers were called in
this rank's last step (forward pre-hooks record it), and then their backward, in reverse. A rank that
has had no step in the context cannot know that order (a model may call a branch registered after its
head): at the first step the ranks still training announce each syncnorm forward, and the start of their
backward, on a message group, and that rank replays them as they come; that step is its last step then.
An empty batch adds zero to every count and sum, so the statistics, the running statistics and
``num_batches_tracked`` come out on the joined rank exactly as on the others: every rank ends the epoch
with the same layers.

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
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.nn.parallel import DistributedDataParallel

from . import _comm
from .batchnorm import _inside_backward, is_syncnorm_layer

_WHO = "syncnorm.joinable"

# The messages by which the ranks still training tell a rank that has had no step in the context which
# layers their first step runs (it cannot know their call order otherwise). Each is one element-wise MAX
# all-reduce of _FIELDS int64 values on the joinable's message group; a rank without a step sends -1s.
_BEGIN, _FORWARD, _BACKWARD, _END = range(4)
_FIELDS = 6  # kind, then: a problem code (_BEGIN) or the layer's index, input dim, dtype, input/output need grad
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# _BEGIN's problem codes: found at the first forward, raised on every rank.
_FINE, _DDP_BROADCASTS, _INSIDE_DDP = range(3)


@dataclass
class _Call:
    """One synchronised training forward of a layer in a step: what its empty stand-in must look like."""

    layer: _BatchNorm
    dim: int
    dtype: torch.dtype
    device: torch.device
    input_requires_grad: bool
    output_requires_grad: bool


def _broadcasting_ddp() -> ValueError:
    return ValueError(
        f"{_WHO} needs DistributedDataParallel(..., forward_sync_buffers=False) (broadcast_buffers=False on "
        "a torch without it): a rank that has run out of batches updates its syncnorm buffers while DDP "
        "would broadcast them (syncnorm keeps them identical on every rank anyway)."
    )


def _problem(code: int) -> ValueError:
    """The error of a ``_BEGIN`` problem code, the same on every rank."""
    if code == _DDP_BROADCASTS:
        error = _broadcasting_ddp()
        return ValueError(f"{error} And pass the DistributedDataParallel model itself: "
                          "Join([syncnorm.joinable(ddp), ddp]), not the module inside it.")
    return ValueError(
        f"{_WHO}(model) was given the module inside a DistributedDataParallel: DDP's collectives at the start of "
        "its forward would come before the joinable's, in the wrong order for a rank that has run out of "
        "batches. Pass the DDP model itself: Join([syncnorm.joinable(ddp), ddp])."
    )


class _SyncNormJoinable(Joinable):
    """The ``Joinable`` that ``syncnorm.joinable`` returns (see there).

    Its hooks exist from the ``Join`` context's construction to its end: a pre-hook on the model starts
    each step, pre- and post-hooks on every syncnorm layer record the step's calls in call order.
    """

    def __init__(self, model: nn.Module, layers: list[_BatchNorm], group: Any, device: torch.device,
                 messages: Any) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self._group = group
        self._device = device
        self._messages = messages
        # The synchronised forwards of this rank's last step, in call order (the collectives to shadow once joined).
        self.last_step: list[_Call] = []
        self._step: list[_Call] = []
        self.shadowing = False
        # Inside a Join context (from its construction to its post-hooks, which every rank runs at its end);
        # Join leaves _join_config enabled after the context, where a notification would be a stray collective.
        self.active = False
        # Until this rank's first step or first main_hook in the context; then whether it tells the others.
        self.first_step = False
        self._announcing = False
        self._backward_announced = False
        self._handles: list[Any] = []
        self._wrapper_handle: Any = None

    def _install(self) -> None:
        self.remove()
        self._handles = [self.model.register_forward_pre_hook(self._step_starts)]
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._record))
            self._handles.append(layer.register_forward_hook(self._recorded))
        if not isinstance(self.model, DistributedDataParallel):
            # Until the model's first forward: a DistributedDataParallel around it would run its collectives first.
            self._wrapper_handle = register_module_forward_pre_hook(self._wrapper_starts)

    def remove(self) -> None:
        """Remove the hooks this joinable put on the model and its layers (the end of its Join context does)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._drop_wrapper_hook()

    def _drop_wrapper_hook(self) -> None:
        if self._wrapper_handle is not None:
            self._wrapper_handle.remove()
            self._wrapper_handle = None

    def _wrapper_starts(self, module: nn.Module, args: Any) -> None:
        if module is self.model:
            self._drop_wrapper_hook()
        elif isinstance(module, DistributedDataParallel) and module.module is self.model:
            self._drop_wrapper_hook()
            broadcasts = getattr(module, "forward_sync_buffers", getattr(module, "broadcast_buffers", False))
            self._step_starts(module, args, _DDP_BROADCASTS if broadcasts else _INSIDE_DDP)

    def _step_starts(self, module: nn.Module, args: Any, problem: int = _FINE) -> None:
        if not (self.active and self._join_config.enable):  # outside a Join context: nothing to do
            return
        if not self._join_config.is_first_joinable:
            # Every rank's first forward in the context raises here, together: no rank is left waiting.
            self.remove()
            raise RuntimeError(
                f"{_WHO}(model) must come first in Join([...]), before DistributedDataParallel: DDP's join hook "
                "waits for gradient all-reduces that the other ranks issue only after their syncnorm forwards, "
                "which wait for this rank. Use Join([syncnorm.joinable(ddp_model), ddp_model])."
            )
        self._end_announcing()
        work = Join.notify_join_context(self)
        if self.first_step:
            self.first_step = False
            # Once a context: a rank that is not active at the first step has no step whose call order it could
            # replay; it learns this step's from messages (its main_hook waits for _BEGIN).
            work.wait()
            if int(work.result()[0].item()) < _comm.world_size(self._group):
                self._send(_BEGIN, problem)
                self._announcing, self._backward_announced = problem == _FINE, False
        if problem != _FINE:
            self.remove()
            raise _problem(problem)
        if work is not None and isinstance(module, DistributedDataParallel):
            # What DDP does with its own notification when it is first: its reducer reads the number of ranks
            # still active from it (Join(..., divide_by_initial_world_size=False) divides gradients by that).
            module.reducer._set_forward_pass_work_handle(work, module._divide_by_initial_world_size)
        if self._step:
            self.last_step = self._step
        self._step = []

    def _record(self, layer: nn.Module, args: Any) -> None:
        if not (self.active and layer.training) or self.shadowing:
            return
        if _inside_backward():
            # Every rank recomputes at the same point of its first backward: all raise here, together.
            self.remove()
            raise RuntimeError(
                f"{_WHO}: activation checkpointing recomputes syncnorm forwards inside backward, and a rank that "
                "has run out of batches cannot replay them; under Join, leave the syncnorm layers out of "
                "checkpointed regions."
            )
        x = args[0] if args else None
        if isinstance(layer, _BatchNorm) and isinstance(x, Tensor):
            output_grad = torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in layer.parameters(recurse=False)))
            call = _Call(layer, x.dim(), x.dtype, x.device, x.requires_grad, output_grad)
            self._step.append(call)
            if self._announcing:
                self._send(_FORWARD, self.layers.index(layer), call.dim, _DTYPES.index(call.dtype),
                           int(call.input_requires_grad), int(call.output_requires_grad))

    def _recorded(self, layer: nn.Module, args: Any, output: Any) -> None:
        if self._announcing and not self._backward_announced and isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._backward_starts)

    def _backward_starts(self, grad: Tensor) -> None:
        """Before the first syncnorm backward of an announced step (a hook on each layer's output)."""
        if self._announcing and not self._backward_announced:
            self._backward_announced = True
            self._send(_BACKWARD)

    def _end_announcing(self) -> None:
        if self._announcing:
            self._announcing = False
            self._send(_END)

    def _send(self, kind: int, *values: int) -> None:
        message = torch.tensor([kind, *values, *[0] * (_FIELDS - 1 - len(values))], dtype=torch.int64,
                               device=self._device)
        _comm.all_reduce_max(message, self._messages)

    def receive(self) -> list[int]:
        """The next message of the ranks still training (this rank had no step in the context)."""
        message = torch.full((_FIELDS,), -1, dtype=torch.int64, device=self._device)
        _comm.all_reduce_max(message, self._messages)
        return [int(v) for v in message.tolist()]

    def join_hook(self, **kwargs: Any) -> JoinHook:
        self._install()
        self.active, self.first_step, self._announcing, self.last_step, self._step = True, True, False, [], []
        return _ShadowSteps(self)

    @property
    def join_device(self) -> torch.device:
        return self._device

    @property
    def join_process_group(self) -> Any:
        return self._group


class _ShadowSteps(JoinHook):
    """On a rank that ran out of batches: one step of every syncnorm layer on an empty batch, per main_hook.

    The step runs in a thread of its own, while this thread goes on to DDP's join hook: the other ranks issue
    DDP's blocking collectives (the bucket-order broadcast of their second step) before their
    syncnorm forwards, and their gradient all-reduces after them, so neither order can be followed serially.
    Each thread uses only the syncnorm layers' groups and the message group; it is joined before the next
    step and after the last.
    """

    def __init__(self, joinable: _SyncNormJoinable) -> None:
        self.joinable = joinable
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def main_hook(self) -> None:
        self._finish()
        joinable = self.joinable
        joinable._end_announcing()  # this rank told a rank without steps about its first step: that step is over
        if joinable._step:  # the rank's last real step, if it had one since the context began
            joinable.last_step, joinable._step = joinable._step, []
        step: Callable[[], None] = lambda: _shadow(joinable.last_step)  # noqa: E731
        if joinable.first_step:
            # No step in this context: the active ranks announce theirs (every rank raises a problem together).
            joinable.first_step = False
            kind, problem = joinable.receive()[:2]
            assert kind == _BEGIN, f"{_WHO}: expected the first step's announcement, got message {kind}"
            if problem != _FINE:
                joinable.remove()
                raise _problem(problem)
            step = self._learn
        self.thread = threading.Thread(target=self._run, args=(step,), name="syncnorm-join", daemon=True)
        self.thread.start()

    def post_hook(self, is_last_joiner: bool) -> None:
        joinable = self.joinable
        joinable._end_announcing()
        joinable.active = False
        try:
            self._finish()
        finally:
            joinable.remove()

    def _finish(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self, step: Callable[[], None]) -> None:
        joinable = self.joinable
        grads = [(p, p.grad) for layer in joinable.layers for p in layer.parameters(recurse=False)]
        joinable.shadowing = True
        try:
            step()
        except BaseException as error:  # raised in the Join context's thread, at the next hook
            self.error = error
        finally:
            joinable.shadowing = False
            for p, grad in grads:  # the empty batches' parameter gradients are zeros: leave the rank's as they were
                p.grad = grad

    def _learn(self) -> None:
        """The active ranks' first step, layer by layer as they announce it; it becomes this rank's last step."""
        joinable = self.joinable
        calls: list[_Call] = []
        outputs: list[tuple[_Call, Tensor]] = []
        while True:
            kind, index, dim, dtype, input_grad, output_grad = joinable.receive()
            if kind == _FORWARD:
                call = _Call(joinable.layers[index], dim, _DTYPES[dtype], joinable.join_device, bool(input_grad),
                             bool(output_grad))
                calls.append(call)
                outputs.append((call, _empty_forward(call)))
            elif kind == _BACKWARD:
                _backward(outputs)
                outputs = []
            else:
                assert kind == _END, f"{_WHO}: unexpected message {kind} from the active ranks"
                break
        joinable.last_step = calls


def _empty_forward(call: _Call) -> Tensor:
    shape = (0, call.layer.num_features) + (1,) * (call.dim - 2)
    with torch.enable_grad():
        empty = torch.empty(shape, dtype=call.dtype, device=call.device, requires_grad=call.input_requires_grad)
        output: Tensor = call.layer(empty)
    return output


def _backward(outputs: list[tuple[_Call, Tensor]]) -> None:
    """The backward all-reduces of the forwards ``outputs``, last forward first."""
    for call, output in reversed(outputs):
        if call.output_requires_grad and output.requires_grad:
            torch.autograd.backward(output, torch.zeros_like(output))


def _shadow(calls: list[_Call]) -> None:
    """Every recorded forward on an empty batch, in call order, then their backward all-reduces."""
    _backward([(call, _empty_forward(call)) for call in calls])


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
        A ``Joinable`` to pass to ``Join`` before the DDP model; its hooks exist from the ``Join``'s
        construction to the end of its context (``.remove()`` takes them off earlier).

    Raises:
        ValueError: ``model`` has no syncnorm layer, or is a DistributedDataParallel that broadcasts
            buffers; ``torch.distributed`` is not initialised; at the first forward inside ``Join``, on every
            rank, if ``model`` is the module inside a DistributedDataParallel (pass the DDP model).
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
    layers: list[_BatchNorm] = [m for m in model.modules() if is_syncnorm_layer(m)]  # type: ignore[misc]
    if not layers:
        raise ValueError(
            f"{_WHO} found no syncnorm layer in {type(model).__name__}; convert the model first "
            "(syncnorm.convert_model(model)), or leave it out of Join."
        )
    world = _comm.world_group()
    group: Any = world
    if isinstance(model, DistributedDataParallel):
        group = model.process_group
        if getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", False)):
            raise _broadcasting_ddp()
    for layer in layers:
        if layer.process_group is None or layer.process_group is world:
            layer.process_group = _comm.dedicated_group(world)
        elif layer.process_group is group:
            raise ValueError(
                f"{_WHO}: a syncnorm layer synchronises over DistributedDataParallel's process group; give the "
                "layers a group of their own (convert_model(model, process_group=...)), so that their all-reduces "
                "never pair with DDP's."
            )
    # The first step's messages go over a group of the joinable's ranks that DDP does not use (a rank without
    # steps receives them in its shadow thread while DDP's join hook runs in the main one).
    return _SyncNormJoinable(model, layers, group, _device(layers), _comm.dedicated_group(group))


def _device(layers: list[_BatchNorm]) -> torch.device:
    for layer in layers:
        for t in list(layer.parameters()) + list(layer.buffers()):
            return t.device
    return torch.device("cpu")
