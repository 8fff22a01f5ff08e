"""Process groups for synchronising BatchNorm within subsets of ranks."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def new_sync_groups(group_size: int) -> Any:
    """Split the world into consecutive groups of ``group_size`` ranks; return this rank's group.

    Every rank must call it (torch.distributed.new_group is collective), with the same size.
    With 8 ranks and ``group_size=2``, ranks {0,1}, {2,3}, {4,5}, {6,7} each pool their batches.

    Args:
        group_size: ranks per group; must divide the world size.

    Returns:
        The process group that contains this rank, to pass as ``process_group``.

    Raises:
        RuntimeError: ``torch.distributed.init_process_group()`` has not run yet.
        ValueError: ``group_size`` is not a positive divisor of the world size.

    Example:
        >>> group = syncnorm.new_sync_groups(2)
        >>> model = syncnorm.convert_model(model, process_group=group)
        >>> # ranks 0 and 1 share statistics, ranks 2 and 3 share theirs
    """
    if not dist.is_initialized():
        raise RuntimeError("new_sync_groups needs torch.distributed.init_process_group() to have run first.")
    world = dist.get_world_size()
    if group_size < 1 or world % group_size != 0:
        raise ValueError(
            f"group_size must be a positive divisor of the world size {world} (got {group_size}); "
            f"for example {world} (one group) or 1 (no synchronisation)."
        )
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = group
    return mine
