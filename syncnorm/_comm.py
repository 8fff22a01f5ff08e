"""Every torch.distributed call syncnorm makes lives here.

One function per kind of exchange. A collective must be entered by every rank of the group, the
same number of times and in the same order, or the job hangs until the group's timeout; callers
therefore decide whether to communicate only from facts every rank shares (training flag, group
size, which inputs need gradients in an identical model), never from local data such as the
local batch size.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._errors import SyncNormError

ProcessGroup = Any  # torch.distributed.ProcessGroup, absent from builds without distributed support

VALIDATION_HINT = (
    "Every rank must run the same syncnorm layers, in the same order, in the same mode; "
    "run with SYNCNORM_VALIDATE=1 to have syncnorm check this and name the layer that differs."
)


def distributed_ready() -> bool:
    """Whether torch.distributed is available and initialised (so that a layer may communicate)."""
    return dist.is_available() and dist.is_initialized()


def statistics_group(process_group: Optional[ProcessGroup], layer: str) -> Optional[ProcessGroup]:
    """The group a layer synchronises over, or None when there is nobody to synchronise with.

    None when torch.distributed is unavailable or not initialised, or when the group has one rank:
    the layer then runs as plain BatchNorm, with zero collectives.
    """
    if not distributed_ready():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise SyncNormError(
            f"{layer}: this process (global rank {dist.get_rank()}) is not a member of the layer's "
            "process_group; give each rank a group that contains it (see syncnorm.new_sync_groups)."
        )
    if dist.get_world_size(group) == 1:
        return None
    return group


def all_reduce_sum(buffer: Tensor, group: ProcessGroup, layer: str, what: str) -> None:
    """Sum ``buffer`` in place over every rank of ``group``; a failure names the layer."""
    try:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as error:
        raise SyncNormError(
            f"{layer}: the all-reduce of the {what} over {dist.get_world_size(group)} ranks failed: "
            f"{error}. A peer may have died, skipped this layer, or timed out. {VALIDATION_HINT}"
        ) from error


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank in ``group``, or 0 when there is no group (one process), e.g. to report on one rank."""
    if group is None:
        return 0
    return int(dist.get_rank(group))


def all_gather_fingerprints(fingerprint: Tensor, group: ProcessGroup, layer: str) -> Tensor:
    """Every rank's ``fingerprint`` (same size on each), stacked in group-rank order; validation mode only."""
    gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(gathered, fingerprint, group=group)
    except RuntimeError as error:
        raise SyncNormError(
            f"{layer}: the validation all-gather over {dist.get_world_size(group)} ranks failed: {error}. "
            "A peer may have died, skipped this layer, or timed out. In validation mode every forward of a "
            "syncnorm layer is collective, in eval mode too: evaluate on a single rank under "
            "`with syncnorm.validation(False):`."
        ) from error
    return torch.stack(gathered)


def group_ranks(group: ProcessGroup) -> list[int]:
    """The global ranks of ``group``, in group-rank order (for messages)."""
    return list(dist.get_process_group_ranks(group))
