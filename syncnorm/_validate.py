"""Validation mode: before each collective, the ranks check that they run the same layer the same way.

A synchronised layer is only correct if every rank of its group enters the same collective with the
same buffer. When one rank runs a different layer (another width, another order, eval instead of
train, a skipped backward), the plain path either pairs the wrong all-reduces (a crash, or worse,
statistics mixed from unrelated layers) or waits until the group's timeout. In validation mode every
rank first all-gathers a small fixed-size fingerprint of what it is about to do and compares the
fingerprints of all ranks, so every rank raises the same ``SyncNormError`` naming the layer, the field
and the ranks that differ, before any statistic is exchanged.

Off by default and free when off (one boolean test a forward, no collective). On with the environment
variable ``SYNCNORM_VALIDATE=1`` (read once, when syncnorm is imported) or, for a block of code, with
``syncnorm.validation()``. When on, every forward of a layer in a group of two or more ranks does one
extra all-gather of 137 int64 values, IN EVAL MODE TOO (so a rank left in eval while the others train
is reported, not left waiting), and every backward that all-reduces does one more.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _comm
from ._errors import SyncNormError

if TYPE_CHECKING:
    from torch.nn.modules.batchnorm import _BatchNorm

ENVIRONMENT_VARIABLE = "SYNCNORM_VALIDATE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _from_environment(value: str) -> bool:
    """The meaning of a ``SYNCNORM_VALIDATE`` value; a value that means neither is refused."""
    normalised = value.strip().lower()
    if normalised in _TRUE:
        return True
    if normalised in _FALSE:
        return False
    raise ValueError(
        f"{ENVIRONMENT_VARIABLE} must be 1 (validate) or 0 (do not), got {value!r}; "
        f"unset it or set {ENVIRONMENT_VARIABLE}=1."
    )


_ENABLED_BY_ENVIRONMENT = _from_environment(os.environ.get(ENVIRONMENT_VARIABLE, ""))
# The innermost active ``validation()`` block decides; empty means the environment decides. Process-wide
# (not per thread), like the process group it guards; never invalid, only pushed and popped.
_OVERRIDES: list[bool] = []


def enabled() -> bool:
    """Whether syncnorm layers validate before communicating, in this process, now."""
    return _OVERRIDES[-1] if _OVERRIDES else _ENABLED_BY_ENVIRONMENT


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Turn validation mode on (or off) for the syncnorm layers run inside the block, on this rank.

    Every rank of a group must be in the same mode: validation adds a collective to each forward, so
    wrap the same code on every rank. In validation mode a forward in eval mode communicates too:
    evaluate on one rank alone under ``validation(False)``. Usable as a decorator as well.

    Args:
        enabled: True to validate inside the block, False to skip validation (e.g. for one rank's
            own evaluation while ``SYNCNORM_VALIDATE=1`` is set).

    Returns:
        A context manager; the previous mode comes back when the block ends, even on an error.

    Raises:
        SyncNormError: raised inside the block, by a syncnorm layer, on every rank of its group, when
            the ranks differ in the layer they run (qualified name, ``num_features``, training flag,
            dtype, input rank and channels, forward or backward); it names the layer, the field and
            each rank's value. ``validation`` itself raises nothing.

    Example:
        >>> with syncnorm.validation():
        ...     loss = model(batch).sum()   # a layer that differs between ranks raises here,
        ...     loss.backward()             # on every rank, naming the layer and the ranks
    """
    _OVERRIDES.append(bool(enabled))
    try:
        yield
    finally:
        _OVERRIDES.pop()


# Field layout of a fingerprint. Compared one by one; each is what the ranks must agree on.
_PHASE, _FEATURES, _TRAINING, _DTYPE, _DIM, _CHANNELS, _NEEDS_GRAD, _NAME_HASH = range(8)
_NAME_BYTES = 128  # the name itself travels too, truncated, so every rank can print the others'
_SIZE = 8 + _NAME_BYTES
_FIELDS = {
    _FEATURES: "num_features",
    _TRAINING: "training flag",
    _DTYPE: "input dtype",
    _DIM: "input rank (number of dimensions)",
    _CHANNELS: "input channels (dim 1)",
    _NEEDS_GRAD: "input needs a gradient",
}
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_PHASES = ("forward", "backward")


def check_forward(layer: _BatchNorm, input: Any, description: str) -> None:
    """Compare this forward with every rank's; raise on every rank if they differ. Collective.

    Called before any other check of the input (and, for a converted subclass, before its own
    ``forward``), so a bad input on one rank (6-D, wrong channels, an integer tensor) is reported on
    every rank instead of leaving the others waiting. ``layer`` is a ``syncnorm.SyncBatchNorm`` or a
    converted subclass; ``description`` names it in the error of a failed collective.
    """
    group = _comm.statistics_group(layer.process_group, description)
    if group is None:  # nobody to compare with: every rank of a one-rank group sees the same
        return
    is_tensor = isinstance(input, Tensor)
    fingerprint = _fingerprint(
        phase=0,
        features=layer.num_features,
        training=layer.training,
        dtype=input.dtype if is_tensor else None,
        dim=input.dim() if is_tensor else -1,
        channels=input.shape[1] if is_tensor and input.dim() >= 2 else -1,
        needs_grad=layer.training and is_tensor and input.requires_grad and torch.is_grad_enabled(),
        name=getattr(layer, "layer_name", None) or "",
        device=input.device if is_tensor else torch.device("cpu"),
    )
    _compare(fingerprint, group, description)


def check_backward(layer: _BatchNorm, output: Tensor, input: Tensor, description: str) -> None:
    """Have the backward of ``output`` validate too, before its all-reduce (a tensor hook; no collective now).

    Catches a rank that skipped a backward and went on to the next forward: its forward fingerprint
    meets the others' backward fingerprint, and every rank raises naming both.
    """
    group = _comm.statistics_group(layer.process_group, description)
    # Only a backward that all-reduces validates: the input needs a gradient on every rank (checked
    # in forward), so every rank registers the hook, or none does.
    if group is None or not (output.requires_grad and input.requires_grad):
        return
    fingerprint = _fingerprint(
        phase=1, features=layer.num_features, training=True, dtype=input.dtype, dim=input.dim(),
        channels=input.shape[1], needs_grad=True, name=getattr(layer, "layer_name", None) or "",
        device=input.device,
    )

    def validate_backward(grad: Tensor) -> None:
        _compare(fingerprint, group, description)

    output.register_hook(validate_backward)


def _fingerprint(*, phase: int, features: int, training: bool, dtype: Any, dim: int, channels: int,
                 needs_grad: bool, name: str, device: torch.device) -> Tensor:
    """What this rank is about to do, as a fixed-size int64 tensor (the same size on every rank)."""
    encoded = name.encode("utf-8")
    # A stable hash (Python's hash() is salted per process) compares names of any length exactly.
    digest = int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little") >> 1
    head = [phase, features, int(training), _DTYPES.index(dtype) if dtype in _DTYPES else -1, dim, channels,
            int(needs_grad), digest]
    shown = list(encoded[:_NAME_BYTES]) + [0] * (_NAME_BYTES - min(len(encoded), _NAME_BYTES))
    return torch.tensor(head + shown, dtype=torch.int64, device=device)


def _compare(fingerprint: Tensor, group: _comm.ProcessGroup, layer: str) -> None:
    """All-gather the fingerprints; every rank sees the same table and so raises the same error, word for word."""
    table = _comm.all_gather_fingerprints(fingerprint, group, layer).cpu()
    if bool((table == table[0]).all()):
        return
    raise SyncNormError(_describe_difference(table, _comm.group_ranks(group)))


def _describe_difference(table: Tensor, ranks: list[int]) -> str:
    """Which field differs, with every rank's value, and what to do about it."""
    names = [_name(row) for row in table]
    if len(set(names)) > 1:
        where = "the ranks of a process group reached different syncnorm layers"
    elif names[0]:
        where = f"layer '{names[0]}' is not the same on every rank of its process group"
    else:
        where = ("an unnamed syncnorm layer (syncnorm.convert_model names them) is not the same on every rank "
                 "of its process group")
    problems = []
    if len(set(table[:, _PHASE].tolist())) > 1:
        doing = ", ".join(f"rank {r} in the {_PHASES[int(row[_PHASE])]} of '{n}'"
                          for r, row, n in zip(ranks, table, names))
        problems.append(f"the ranks are not in the same pass ({doing}): a rank skipped a backward "
                        "(or ran an extra forward); every rank must run backward through the same layers")
        return _message(where, problems)
    if len(set(table[:, _NAME_HASH].tolist())) > 1:
        problems.append("layer name differs (" + _per_rank(ranks, [repr(n) for n in names]) + "): the ranks "
                        "run different layers here (another model, another layer order, or a layer skipped)")
    for field, label in _FIELDS.items():
        values = table[:, field].tolist()
        if len(set(values)) > 1:
            problems.append(f"{label} differs (" + _per_rank(ranks, [_show(field, v) for v in values]) + ")")
    return _message(where, problems)


def _message(where: str, problems: list[str]) -> str:
    return (
        f"syncnorm validation: {where}: "
        + "; ".join(problems)
        + ". Every rank must run the same syncnorm layers, in the same order, in the same mode, with "
        "inputs of the same rank and dtype."
    )


def _per_rank(ranks: list[int], values: list[str]) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in zip(ranks, values))


def _show(field: int, value: int) -> str:
    if field == _DTYPE:
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "not a floating-point tensor"
    if field in (_TRAINING, _NEEDS_GRAD):
        return str(bool(value))
    if field in (_DIM, _CHANNELS) and value < 0:
        return "no such dimension"
    return str(value)


def _name(row: Tensor) -> str:
    shown = bytes(b for b in row[_NAME_HASH + 1 :].tolist() if b)
    return shown.decode("utf-8", errors="replace")
