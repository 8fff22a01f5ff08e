"""Every torch.distributed call syncnorm makes lives here.

One function per kind of exchange. A collective must be entered by every rank of the group, the
same number of times and in the same order, or the job hangs until the group's timeout; callers
therefore decide whether to communicate only from facts every rank shares (training flag, group
size, which inputs need gradients in an identical model), never from local data such as the
local batch size.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ._errors import SyncNormError

if dist.is_available():
    # Imported now, before the script's init_process_group: its functions take `group=group.WORLD` as a default,
    # evaluated when the module is first imported (torch 2.13, 2.14). torch imports it lazily (torch._dynamo
    # does, e.g. at an optimizer's first step): imported after init_process_group, those defaults keep the world
    # group, so destroy_process_group() cannot free it and its Gloo threads run on into the interpreter's
    # teardown, where a rank can abort ("terminate called without an active exception") after a finished job.
    import torch.distributed.nn.functional  # noqa: F401

ProcessGroup = Any  # torch.distributed.ProcessGroup, absent from builds without distributed support
GroupOrMesh = Any  # a ProcessGroup, a torch.distributed.device_mesh.DeviceMesh, or None (the whole world)
# Where a training step's sums go: a ProcessGroup (eager), its registered name (while torch.compile traces:
# a ProcessGroup object passed to an autograd.Function breaks dynamo's graph), or None (one process).
Comm = Union[ProcessGroup, str, None]

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
    the layer then runs as plain BatchNorm, with zero collectives. ``process_group`` is already
    resolved (``resolve_group``, when the layer was built or converted): a forward never creates a group.
    """
    if not distributed_ready():
        return None
    group: Any = process_group if process_group is not None else dist.group.WORLD
    # The group's own methods (C++), not dist.get_rank/get_world_size (a few us of Python each, per layer step):
    # a rank outside a group holds torch's NON_GROUP_MEMBER sentinel in its place, never a ProcessGroup.
    if group is dist.GroupMember.NON_GROUP_MEMBER or group.rank() < 0:
        raise SyncNormError(
            f"{layer}: this process (global rank {dist.get_rank()}) is not a member of the layer's "
            "process_group; give each rank a group that contains it (see syncnorm.new_sync_groups)."
        )
    if group.size() == 1:
        return None
    return group


def all_reduce(buffer: Tensor, comm: Comm, layer: str, what: str) -> Tensor:
    """The sum of ``buffer`` over the ranks of ``comm`` (see ``Comm``): ``buffer`` itself, summed in place,
    eagerly; a new tensor, from a functional collective that dynamo traces, for a group's name; ``buffer``
    as it is for None."""
    if comm is None:
        return buffer
    if isinstance(comm, str):
        from torch.distributed import _functional_collectives as funcol

        # wait_tensor makes the result an ordinary tensor in eager (funcol returns an AsyncCollectiveTensor).
        return funcol.wait_tensor(funcol.all_reduce(buffer, "sum", comm))  # type: ignore[arg-type]
    all_reduce_sum(buffer, comm, layer, what)
    return buffer


def group_name(group: Optional[ProcessGroup]) -> Optional[str]:
    """The registered name of a ProcessGroup (what functional collectives take), None for no group."""
    return None if group is None else str(group.group_name)


def all_reduce_sum(buffer: Tensor, group: ProcessGroup, layer: str, what: str) -> None:
    """Sum ``buffer`` in place over every rank of ``group``; a failure names the layer."""
    try:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as error:
        raise SyncNormError(
            f"{layer}: the all-reduce of the {what} over {dist.get_world_size(group)} ranks failed: "
            f"{error}. A peer may have died, skipped this layer, or timed out. {VALIDATION_HINT}"
        ) from error


def all_reduce_max(buffer: Tensor, group: ProcessGroup) -> None:
    """Element-wise maximum of ``buffer`` in place over every rank of ``group`` (joinable's messages)."""
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=group)


def world_group() -> ProcessGroup:
    """The default group (the whole world)."""
    return dist.group.WORLD


def world_size(group: ProcessGroup) -> int:
    """The number of ranks of ``group``."""
    return dist.get_world_size(group)


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


def resolve_group(process_group: GroupOrMesh, who: str) -> Optional[ProcessGroup]:
    """The ProcessGroup that ``process_group`` (a group, a DeviceMesh or None) stands for; the one place meshes resolve.

    A ProcessGroup and None are returned as they are. A 1-D DeviceMesh (``mesh["dp"]`` of a larger one
    too) gives its own group; an N-D DeviceMesh gives one group spanning all of its ranks, created once
    per mesh and cached, so every call for a mesh returns the SAME object (a new group at every step
    would create a communicator at every step).

    Creating the group of an N-D mesh is collective over the whole world: every rank must resolve the
    same meshes in the same order (building, converting or ``update_bn_stats``, which run on every rank
    alike), including ranks outside the mesh, which take part and then raise.
    """
    if process_group is None:
        return None
    mesh_class = _device_mesh_class()
    if mesh_class is not None and isinstance(process_group, mesh_class):
        return _mesh_group(process_group, who)
    if dist.is_available() and (isinstance(process_group, dist.ProcessGroup)
                                or process_group is dist.GroupMember.NON_GROUP_MEMBER):
        # new_group's answer on a rank outside the group is accepted here: the forward names the problem.
        return process_group
    if isinstance(process_group, str):  # a mesh dimension's name, e.g. Lightning's "data_parallel"
        raise TypeError(
            f"{who} expected process_group to be a torch.distributed ProcessGroup, a DeviceMesh or None (the whole "
            f"world), got the string {process_group!r}; a mesh dimension's name does not say which mesh: pass the "
            f"sub-mesh, mesh[{process_group!r}]."
        )
    raise TypeError(
        f"{who} expected process_group to be a torch.distributed ProcessGroup, a DeviceMesh or None (the whole "
        f"world), got {type(process_group).__name__}; pass e.g. dist.new_group(ranks), "
        "init_device_mesh('cuda', (world_size,)) or mesh['dp']."
    )


def _device_mesh_class() -> Optional[type]:
    if not dist.is_available():
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh if isinstance(DeviceMesh, type) else None


# The group spanning an N-D mesh's ranks, per mesh (DeviceMesh hashes and compares by its layout and
# ranks), with the default group it was made under. An entry is valid while that default group is the
# current one: after destroy_process_group() and a new init_process_group() (an elastic restart) a mesh
# equal to an old one gets a new group.
_MESH_GROUPS: dict[Any, tuple[Any, ProcessGroup]] = {}


def _mesh_group(mesh: Any, who: str) -> Optional[ProcessGroup]:
    if not distributed_ready():
        raise ValueError(f"{who} got a DeviceMesh, but torch.distributed is not initialised in this process.")
    member = mesh.get_coordinate() is not None
    if mesh.ndim == 1:
        if not member:
            raise _not_in_mesh(mesh, who)
        return mesh.get_group()
    world = dist.group.WORLD
    cached = _MESH_GROUPS.get(mesh)
    if cached is not None and cached[0] is world:
        group = cached[1]
    else:
        group = _new_mesh_group(mesh, member)
        _MESH_GROUPS[mesh] = (world, group)
    if not member:
        raise _not_in_mesh(mesh, who)
    return group


def _new_mesh_group(mesh: Any, member: bool) -> Any:
    """The group of this rank's copy of ``mesh`` (its ranks differ between ranks for a sub-mesh); collective."""
    # Every rank of the world creates every copy's group, in the same (sorted) order, as new_group requires:
    # a sub-mesh such as mesh["replicate", "shard"] of a 3-D mesh has one copy per remaining coordinate.
    mine = sorted(int(r) for r in mesh.mesh.flatten().tolist()) if member else []
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    copies = sorted({tuple(ranks) for ranks in everyone if ranks})
    group = None
    for ranks in copies:
        created = dist.new_group(list(ranks))
        if tuple(mine) == ranks:
            group = created
    return group


def _not_in_mesh(mesh: Any, who: str) -> ValueError:
    return ValueError(
        f"{who} got a DeviceMesh that does not contain this process (global rank {dist.get_rank()}; the mesh's "
        f"ranks are {mesh.mesh.flatten().tolist()}); give each rank a mesh it belongs to, e.g. mesh['dp'] of the "
        "mesh built on every rank with init_device_mesh."
    )


# A second group with the same ranks as a group, per group: syncnorm's statistics on a communicator of their
# own, so that their all-reduces never queue or pair with another user's (DistributedDataParallel's) on the
# same communicator. Valid while the default group it was made under is the current one (as _MESH_GROUPS).
_DEDICATED: dict[Any, tuple[Any, ProcessGroup]] = {}


def dedicated_group(group: ProcessGroup) -> ProcessGroup:
    """A group of the same ranks as ``group``, created once per group; collective over the whole world."""
    world = dist.group.WORLD
    cached = _DEDICATED.get(group)
    if cached is None or cached[0] is not world:
        cached = (world, dist.new_group(group_ranks(group)))
        _DEDICATED[group] = cached
    return cached[1]
