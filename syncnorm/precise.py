"""Distributed precise-BN: running statistics recomputed as exact population statistics over data.

During training, running_mean/running_var are exponential averages of batch statistics taken
while the weights changed; "precise BN" (Wu & Johnson, "Rethinking Batch in BatchNorm", 2021)
replaces them, after training or before evaluation, with the statistics of many batches under the
final weights. ``torch.optim.swa_utils.update_bn`` does it in one process and fvcore's
``update_bn_stats`` averages per-batch variances; this one pools every rank's batches and returns
the exact population statistics, identical on every rank.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _comm, _stats
from .batchnorm import is_syncnorm_layer

_WHO = "syncnorm.update_bn_stats"


def update_bn_stats(
    model: nn.Module,
    loader: Iterable[Any],
    num_batches: Optional[int] = None,
    *,
    process_group: _comm.GroupOrMesh = None,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
) -> None:
    r"""Set every BatchNorm's running statistics to the exact statistics of ``num_batches`` batches of every rank.

    The model runs in training mode under ``torch.no_grad()`` on ``num_batches`` batches of
    ``loader`` on every rank of ``process_group``; each layer normalises as in training (a
    converted model with the statistics of each step's global batch), and every value that enters
    a BatchNorm layer on any rank is pooled. Given a ``process_group``, every synchronised layer
    (``syncnorm.SyncBatchNorm``, a converted subclass, ``torch.nn.SyncBatchNorm``) synchronises its
    forwards over that group alone while this runs, and is afterwards, also if anything fails, as it
    was before (its own group, and whatever else it keeps besides its running statistics, so that ranks
    outside the group stay in step with it): with a group of one rank, precise BN before a rank-0-only
    evaluation involves no other rank. Then, per channel, with N the number of those values,

    - ``running_mean`` = their mean, ``sum(x) / N``;
    - ``running_var`` = their variance with Bessel's correction over the global count,
      ``sum((x - mean)^2) / (N - 1)`` (the convention BatchNorm's ``running_var`` follows),

    i.e. what one process computes from the union of all the batches of all the ranks, not an
    average of per-batch variances (which misses the spread between batch means). Moments are
    accumulated in float64 about each rank's first batch mean and merged with two all-reduces at
    the end (the global mean, then the squares about it), so float64 input keeps float64 accuracy
    however large |mean| / std; every rank gets the same values. Only layers that track running
    statistics (any ``_BatchNorm``: torch's, syncnorm's, converted subclasses) are updated; a
    layer that saw fewer than two values in all is left as it was, with a warning. Training flags
    and ``num_batches_tracked`` are restored afterwards; if anything fails, the running statistics
    are restored too.

    All ranks must call it together. Ranks stop together at the first batch some rank does not
    have (one small all-reduce per batch decides), so loaders of unequal length never hang; if
    ``num_batches`` was asked for and a rank runs out first, every rank raises ``ValueError``.

    Args:
        model: the model (converted, DDP-wrapped or plain); its BatchNorm layers are updated in place.
        loader: an iterable of batches; a batch that is a list or tuple is fed as its first element,
            like ``torch.optim.swa_utils.update_bn``.
        num_batches: how many batches each rank uses (default: all of them, up to the shortest
            loader of the group).
        process_group: the ranks whose batches are pooled and over which the model's synchronised
            layers synchronise during this call, a ProcessGroup or a DeviceMesh (``mesh["dp"]``; an N-D
            mesh pools all of its ranks); default: each layer synchronises over its own group and the
            pooling is over the whole world (without an initialised process group, this process alone).
        device: where each batch is moved before the forward pass (default: left where it is).
        progress: show a tqdm progress bar on rank 0 (if tqdm is installed).

    Returns:
        None; the model's running statistics are set in place.

    Raises:
        ValueError: ``num_batches`` below 1, or more batches asked for than some rank's loader has
            (raised on every rank, after the running statistics were restored).
        SyncNormError: a collective of the merge failed or timed out (a peer died, or did not call
            ``update_bn_stats``), or this process is not in ``process_group``.

    Example:
        >>> model = syncnorm.convert_model(model)  # then train, then:
        >>> syncnorm.update_bn_stats(model, train_loader, num_batches=200)
        >>> model.eval()  # evaluates with the population statistics
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"{_WHO} expected num_batches >= 1 or None (all batches), got {num_batches}.")
    resolved = _comm.resolve_group(process_group, _WHO)  # on every rank, first: a mesh's group is collective
    layers = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]
    # Identical models on every rank: either all ranks return here or none does.
    if not layers:
        return
    group = _comm.statistics_group(resolved, _WHO)
    flags = {m: m.training for m in model.modules()}
    saved = [(_running(m)[0].clone(), _running(m)[1].clone(), _clone(m.num_batches_tracked)) for _, m in layers]
    sums: list[Optional[Tensor]] = [None] * len(layers)
    hooks = [m.register_forward_pre_hook(_accumulator(sums, i)) for i, (_, m) in enumerate(layers)]
    lent = _lend_group(model, resolved)
    try:
        model.train()
        with torch.no_grad():
            seen = _run_batches(model, loader, num_batches, group, device, progress, _running(layers[0][1])[0].device)
        _set_population_statistics(layers, sums, group, seen)
    except BaseException:
        for (_, m), (mean, var, _tracked) in zip(layers, saved):
            _running(m)[0].copy_(mean)
            _running(m)[1].copy_(var)
        raise
    finally:
        for layer, before in lent:
            _put_back(layer, before)
        for hook in hooks:
            hook.remove()
        for module, training in flags.items():
            module.training = training
        for (_, m), (_mean, _var, tracked) in zip(layers, saved):
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _lend_group(model: nn.Module, group: Optional[_comm.ProcessGroup]) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Give every synchronised layer of ``model`` the group ``group`` (unless None); each layer and its attributes.

    Without it each forward would synchronise over the layer's own group (the world, by default) and
    wait for ranks that are not calling update_bn_stats.
    """
    if group is None:
        return []
    lent = []
    for m in model.modules():
        if (is_syncnorm_layer(m) or isinstance(m, nn.SyncBatchNorm)) and m.process_group is not group:
            lent.append((m, _attributes(m)))
            m.process_group = group
    return lent


def _attributes(layer: nn.Module) -> dict[str, Any]:
    """The layer's own attributes (not its parameters, buffers or submodules), tensors copied."""
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in vars(layer).items()}


def _put_back(layer: nn.Module, before: dict[str, Any]) -> None:
    """Give ``layer`` the attributes ``before`` again: its own group, and any attribute the forwards over the lent
    group changed (on the ranks of that group only, so the ranks outside it would otherwise disagree)."""
    state = vars(layer)
    for name in [name for name in state if name not in before]:
        del state[name]
    for name, value in before.items():
        current = state.get(name)
        if (isinstance(value, Tensor) and isinstance(current, Tensor)
                and (current.shape, current.dtype, current.device) == (value.shape, value.dtype, value.device)):
            with torch.no_grad():
                current.copy_(value)  # in place: the tensor a compiled graph may hold stays the same object
        else:
            state[name] = value


def _running(layer: _BatchNorm) -> tuple[Tensor, Tensor]:
    assert layer.running_mean is not None and layer.running_var is not None  # only such layers are collected
    return layer.running_mean, layer.running_var


def _clone(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clone()


def _accumulator(sums: list[Optional[Tensor]], index: int) -> Any:
    """A forward pre-hook adding the float64 ``[n, sum (x-c), sum (x-c)^2, c]`` of a layer's input to ``sums[index]``.

    ``c`` is the mean of the first batch this rank saw: every later batch is summed about it, so a
    large mean never cancels (float64 accuracy however large |mean| / std is).
    """

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        previous = sums[index]
        local = _stats.local_moments(x)
        if previous is None:
            shift = local.shift.double()
            sums[index] = torch.cat([_stats.pack_moments(local, shift), shift])
        else:
            channels = local.shift.numel()
            previous[: 1 + 2 * channels].add_(_stats.pack_moments(local, previous[1 + 2 * channels :]))

    return hook


def _run_batches(
    model: nn.Module, loader: Iterable[Any], num_batches: Optional[int], group: Optional[_comm.ProcessGroup],
    device: Optional[torch.device | str], progress: bool, flag_device: torch.device,
) -> int:
    """Forward up to ``num_batches`` batches, as many on every rank; the number run."""
    batches: Iterator[Any] = iter(loader)
    bar = _progress_bar(num_batches, progress and _comm.group_rank(group) == 0)
    done = 0
    try:
        for _ in itertools.count() if num_batches is None else range(num_batches):
            batch: Any = next(batches, _END)
            if not _every_rank_has_a_batch(batch is not _END, group, flag_device):
                break
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            model(batch if device is None else batch.to(device))
            done += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if num_batches is not None and done < num_batches:
        raise ValueError(
            f"{_WHO} was asked for num_batches={num_batches} but a loader ran out after {done} batches (on this "
            "rank or another one of the group); pass a smaller num_batches, or None to use every batch the "
            "shortest loader has."
        )
    return done


_END = object()


def _every_rank_has_a_batch(has_batch: bool, group: Optional[_comm.ProcessGroup], device: torch.device) -> bool:
    """Whether no rank of ``group`` has run out of batches; every rank gets the same answer."""
    if group is None:
        return has_batch
    missing = torch.tensor([0.0 if has_batch else 1.0], dtype=torch.float64, device=device)
    _comm.all_reduce_sum(missing, group, _WHO, "number of ranks without a batch")
    return bool(missing.item() == 0)


def _progress_bar(total: Optional[int], show: bool) -> Any:
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, desc=_WHO, unit="batch")


def _set_population_statistics(
    layers: list[tuple[str, _BatchNorm]], sums: list[Optional[Tensor]], group: Optional[_comm.ProcessGroup],
    batches: int,
) -> None:
    """Merge every rank's float64 moments exactly and write mean / unbiased variance.

    Two all-reduces: the counts and sums give the global mean ``m``; then every rank moves its sum of
    squares from its own shift to ``m`` (small terms only) before the second one sums them.
    """
    device = _running(layers[0][1])[0].device
    parts = []
    for s, (_, m) in zip(sums, layers):
        channels = m.num_features
        parts.append(s.to(device) if s is not None else torch.zeros(1 + 3 * channels, dtype=torch.float64,
                                                                    device=device))
    firsts = []
    for part in parts:
        channels = (part.numel() - 1) // 3
        n, sum_dev, shift = part[:1], part[1 : 1 + channels], part[1 + 2 * channels :]
        firsts.append(torch.cat([n, sum_dev + shift * n]))
    first = torch.cat(firsts)
    if group is not None:
        _comm.all_reduce_sum(first, group, _WHO, "population counts and sums")
    seconds, totals = [], []
    for part, head in zip(parts, first.split([f.numel() for f in firsts])):
        channels = (part.numel() - 1) // 3
        n = part[0]
        sum_dev, sum_sq, shift = part[1 : 1 + channels], part[1 + channels : 1 + 2 * channels], part[1 + 2 * channels :]
        mean = head[1:] / head[0]
        delta = shift - mean
        # sum (x-m)^2 = sum (x-c)^2 + 2 (c-m) sum (x-c) + n (c-m)^2, every term small
        seconds.append(sum_sq + 2 * delta * sum_dev + n * delta * delta)
        totals.append((head[0], mean))
    second = torch.cat(seconds)
    if group is not None:
        _comm.all_reduce_sum(second, group, _WHO, "population moments")
    for (name, layer), (num_values, mean), m2 in zip(layers, totals, second.split([s.numel() for s in seconds])):
        count = int(num_values.item())
        if count < 2:
            warnings.warn(
                f"{_WHO}: BatchNorm layer '{name}' saw {count} value(s) per channel in {batches} batches on all ranks "
                "together; its running statistics are left as they were (is it used in the forward pass?).",
                stacklevel=3,
            )
            continue
        var = (m2 / num_values).clamp_(min=0)  # biased; running_var is unbiased with the global count
        with torch.no_grad():
            running_mean, running_var = _running(layer)
            running_mean.copy_(mean)
            running_var.copy_(var * (num_values / (num_values - 1)))
