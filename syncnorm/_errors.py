"""The one exception type syncnorm adds."""

from __future__ import annotations


class SyncNormError(RuntimeError):
    """A problem between ranks: a failed or mismatched collective, a rank outside the layer's group."""
