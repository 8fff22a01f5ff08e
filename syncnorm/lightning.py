"""``SyncNormLayerSync``: syncnorm as a Lightning ``LayerSync`` plugin.

``Trainer(strategy="ddp", plugins=[SyncNormLayerSync()])`` converts the LightningModule's BatchNorm
layers with ``syncnorm.convert_model`` when fitting starts (DDPStrategy.setup, before the device move
and the DDP wrap) and gives them back their original classes when fitting ends (teardown). Unlike
``Trainer(sync_batchnorm=True)``, which uses ``torch.nn.SyncBatchNorm``, it runs on CPU (Gloo) as
well as on GPUs, and the reverted model holds its own classes, not Lightning's ``_BatchNormXd``.

Lightning ships under two package names, ``pytorch_lightning`` and ``lightning`` (as
``lightning.pytorch``), each with its own ``LayerSync`` base class that its Trainer checks with
``isinstance``. ``SyncNormLayerSync`` subclasses the ``LayerSync`` of each of the two that is
installed, so one class serves both Trainers, whichever is imported.
"""

from __future__ import annotations

from typing import Any, Callable, Union

from torch import nn

from . import _comm
from .batchnorm import is_syncnorm_layer
from .convert import Exclude, convert_model, revert_model

# A group, or a function that makes one in each worker (ddp_spawn pickles the plugin before any group exists).
GroupOrFactory = Union[_comm.GroupOrMesh, Callable[[], _comm.GroupOrMesh], None]


def _layer_sync_bases() -> tuple[type, ...]:
    """The ``LayerSync`` base classes of the installed Lightning packages (pytorch_lightning first)."""
    bases: list[type] = []
    try:
        from pytorch_lightning.plugins import LayerSync as PLLayerSync
    except ImportError:
        pass
    else:
        bases.append(PLLayerSync)
    try:
        from lightning.pytorch.plugins import LayerSync as LLayerSync
    except ImportError:
        pass
    else:
        bases.append(LLayerSync)
    if not bases:
        raise ImportError(
            "syncnorm.lightning needs Lightning, as the package pytorch-lightning or lightning, and found "
            "neither; install one with `pip install 'syncnorm[lightning]'` (pytorch-lightning) or "
            "`pip install lightning`."
        )
    return tuple(bases)


_BASES = _layer_sync_bases()


class SyncNormLayerSync(*_BASES):  # type: ignore[misc]
    """A Lightning ``LayerSync`` plugin that synchronises BatchNorm with syncnorm.

    ``apply`` is ``syncnorm.convert_model`` and ``revert`` undoes exactly what ``apply`` did: the
    layers it converted get their original classes back (``torch.nn.BatchNorm2d``, timm's
    ``BatchNormAct2d``, ``torch.nn.SyncBatchNorm``...), with the trained parameters and buffers,
    while layers that were syncnorm layers before ``fit`` stay as they were. The plugin pickles, so
    it works with ``strategy="ddp_spawn"``, which sends the plugins to its worker processes.

    Do not also pass ``sync_batchnorm=True``: that asks for Lightning's own ``TorchSyncBatchNorm``
    plugin, and Lightning refuses two layer-sync plugins with a MisconfigurationException.

    Args:
        process_group: the ranks whose batches are pooled (default: the whole world). Either a
            process group or a DeviceMesh (``mesh["dp"]``; an N-D mesh pools all of its ranks), or a
            picklable function without arguments that returns one, called on
            every rank in ``apply`` (after Lightning initialised torch.distributed), e.g.
            ``functools.partial(syncnorm.new_sync_groups, 2)``. With ``ddp_spawn`` it must be the
            function: a process group cannot be sent to another process.
        exclude: layers to leave local, as in ``syncnorm.convert_model``: qualified module names of
            the LightningModule or a predicate ``(name, module) -> bool`` (module-level, so that it
            pickles, for ``ddp_spawn``).

    Raises:
        TypeError: when pickled (``strategy="ddp_spawn"``) holding a process group object instead of
            a function that makes one.
        ImportError: on ``import syncnorm.lightning`` when neither ``pytorch_lightning`` nor
            ``lightning`` is installed.

    Example:
        >>> from syncnorm.lightning import SyncNormLayerSync
        >>> trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncNormLayerSync()])
        >>> trainer.fit(model)  # model's BatchNorm layers sync during fit, and are BatchNorm again after
    """

    def __init__(self, process_group: GroupOrFactory = None, *, exclude: Exclude = None) -> None:
        self.process_group = process_group
        self.exclude = exclude
        # Qualified names of the layers the last apply converted: the ones revert gives back.
        self.converted: list[str] = []

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert the BatchNorm layers of ``model`` in place (``syncnorm.convert_model``).

        Lightning's DDP strategies call it when ``fit`` starts, before the device move and the DDP wrap.

        Args:
            model: the LightningModule (or any module).

        Returns:
            ``model`` itself, converted; the names of the layers it converted are kept for ``revert``.

        Raises:
            ValueError: a name in ``exclude`` is not a module of ``model``.
        """
        group = self.process_group() if callable(self.process_group) else self.process_group
        before = {name for name, layer in model.named_modules() if is_syncnorm_layer(layer)}
        convert_model(model, group, exclude=self.exclude)
        self.converted = [
            name for name, layer in model.named_modules() if is_syncnorm_layer(layer) and name not in before
        ]
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Give the layers ``apply`` converted their original classes back, in place.

        Lightning calls it when ``fit`` ends. Layers that were syncnorm layers before ``apply`` stay so.

        Args:
            model: the module ``apply`` converted.

        Returns:
            ``model`` itself, with the trained parameters and buffers in its original layer classes.
        """
        converted = set(self.converted)
        for name, layer in model.named_modules():
            if name in converted:
                revert_model(layer)
        self.converted = []
        return model

    def __getstate__(self) -> dict[str, Any]:
        if self.process_group is not None and not callable(self.process_group):
            raise TypeError(
                "SyncNormLayerSync cannot be pickled with a process group (ddp_spawn sends the plugin to new "
                f"processes, and a process group exists only in the process that made it; got "
                f"{type(self.process_group).__name__}). Pass a function that makes the group in each worker, "
                "e.g. SyncNormLayerSync(functools.partial(syncnorm.new_sync_groups, 2)), or use strategy='ddp'."
            )
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"SyncNormLayerSync(process_group={self.process_group!r}, exclude={self.exclude!r})"
