"""syncnorm: BatchNorm with the statistics of the global batch, on every rank, for one all-reduce a layer."""

from __future__ import annotations

from ._errors import SyncNormError
from ._validate import validation
from .activation import SyncBatchNormAct
from .batchnorm import SyncBatchNorm
from .convert import convert_model, revert_model
from .groups import new_sync_groups
from .join import joinable
from .precise import update_bn_stats

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "SyncNormError",
    "convert_model",
    "joinable",
    "new_sync_groups",
    "revert_model",
    "update_bn_stats",
    "validation",
]
__version__ = "0.2.0"
