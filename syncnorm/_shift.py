"""The merge shift: the one cache a syncnorm layer keeps, and everything that happens to it.

Why a shift: every rank sends float64 sums of deviations about a per-channel shift ``s`` that is
the SAME on every rank, and the merged variance carries a rounding error of about
``1e-16 * ((mean - s) / std)^2`` (``_stats``). Summed about zero, float64 data at mean/std 1e6
keeps only 4 digits of its variance. So ``s`` must be common to all ranks AND near this step's mean.

What the layer keeps: ``MergeShift.shifts``, a float64 ``(2, C)`` tensor of two candidate shifts on the
input's device, ``[last step's global mean, the candidate chosen at the last step]`` (a non-finite
mean leaves its channel's first candidate as it was). A training step sums about both candidates (one
all-reduce of ``4C + 1`` values) and, per channel and on the device, keeps the sums about the one
nearer this step's mean: after a NaN or an outlier batch, the other candidate is still last good
step's mean. Both are computed only from all-reduced buffers, so they are identical on every rank.

It is a cache, never state: a layer's results are a function of its parameters, its state_dict
buffers and its input. The cache is *unknown* on a fresh layer, after ``load_state_dict``,
``reset_running_stats``, unpickling, a change of process group, device or channel count; the next
training forward then takes ONE MORE all-reduce (the global mean first, then the sums about it, exact
whatever the data) and sets the cache from the result. Those events happen on every rank together
(as a model's construction, loading and moves do in data-parallel training), so every rank takes the
same number of collectives. Validation mode compares every rank's cache before each step. With a
known cache a step's statistics differ from the exact ones by the rounding above only, which stays
below the input dtype's tolerance unless a channel's mean jumps by more than ~1000 standard deviations
away from BOTH candidates at once (two consecutive outlier steps in the same channel).

This module is the cache's one home: it creates, validates, invalidates, copies and fingerprints it.
The kernels only read the candidates and write the next ones (``_stats.finish_statistics``,
``_triton``).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Optional

import torch
from torch import Tensor

ATTRIBUTE = "_syncnorm_merge_shift"
CANDIDATES = 2  # rows of MergeShift.shifts


class MergeShift:
    """A layer's candidate shifts for the float64 merge (``shifts`` None: unknown) and the group they belong to."""

    __slots__ = ("shifts", "_group")

    def __init__(self) -> None:
        self.shifts: Optional[Tensor] = None  # float64 (CANDIDATES, C), identical on every rank of ``group``
        # A weak reference: a layer must not keep a destroyed process group (and its threads) alive until the
        # interpreter's exit, where tearing down Gloo's threads aborted the process ("terminate called").
        self._group: Optional[weakref.ref[Any]] = None

    @property
    def group(self) -> Any:
        """The group the candidates were formed over (None: none, or it no longer exists)."""
        return None if self._group is None else self._group()

    @group.setter
    def group(self, group: Any) -> None:
        self._group = None if group is None else weakref.ref(group)

    def __deepcopy__(self, memo: dict[int, Any]) -> MergeShift:
        # deepcopy (EMA copies, model snapshots) copies the candidates; the group is shared, never copied.
        new = MergeShift()
        new.shifts = None if self.shifts is None else copy.deepcopy(self.shifts, memo)
        new._group = self._group
        return new

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # A pickled layer (ddp_spawn, torch.save of a whole module) arrives unknown: a group does not travel.
        return (MergeShift, ())


def for_step(layer: torch.nn.Module, group: Any, x: Tensor) -> MergeShift:
    """``layer``'s cache for an eager training step on ``x`` over ``group``: unknown unless formed over exactly that.

    Creates it on first use (never in ``__init__``, so meta-device construction and ``to_empty`` need
    nothing of it) and forgets candidates formed over another group, device or channel count.
    """
    cache: Optional[MergeShift] = layer.__dict__.get(ATTRIBUTE)
    if cache is None:
        cache = MergeShift()
        layer.__dict__[ATTRIBUTE] = cache
    shifts = cache.shifts
    if shifts is not None and not _fits(cache, group, x):
        cache.shifts = None
    cache.group = group
    return cache


def known_shifts(layer: torch.nn.Module, group: Any, x: Tensor) -> Optional[Tensor]:
    """The candidates when known for ``group`` and ``x``, else None; reads only (the torch.compile path)."""
    cache: Optional[MergeShift] = layer.__dict__.get(ATTRIBUTE)
    if cache is None or cache.shifts is None or not _fits(cache, group, x):
        return None
    return cache.shifts


def _fits(cache: MergeShift, group: Any, x: Tensor) -> bool:
    shifts = cache.shifts
    assert shifts is not None
    return cache.group is group and shifts.device == x.device and shifts.shape[1] == x.shape[1]


def invalidate(layer: torch.nn.Module) -> None:
    """Forget ``layer``'s candidates (a load or a reset): its next training step takes one more all-reduce."""
    cache: Optional[MergeShift] = layer.__dict__.get(ATTRIBUTE)
    if cache is not None:
        cache.shifts = None


def new_candidates(channels: int, device: torch.device) -> Tensor:
    """The tensor a step that found the cache unknown writes its next candidates into."""
    return torch.empty(CANDIDATES, channels, dtype=torch.float64, device=device)


def fingerprint(layer: torch.nn.Module, group: Any, x: Tensor) -> bytes:
    """The bytes of the candidates the next step will use (empty when unknown): validation compares them."""
    shifts = known_shifts(layer, group, x)
    return b"" if shifts is None else shifts.detach().cpu().numpy().tobytes()
