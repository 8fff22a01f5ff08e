"""The one exception type syncnorm adds."""

from __future__ import annotations


class SyncNormError(RuntimeError):
    """A problem between ranks: a failed or mismatched collective, a rank outside the layer's group.

    A ``RuntimeError``, raised on every rank that can see the problem, with a message that names the
    layer (its qualified name in the model), what was expected, and what came. Bad arguments and bad
    input of one rank are ``ValueError`` or ``TypeError`` instead, raised before any collective.

    Raised, for example, when validation mode finds ranks running different layers (another
    ``num_features``, eval on one rank and training on another), when a collective fails or does not
    complete within the process group's timeout (a rank died, a rank skipped backward), when a rank
    runs a layer whose process group does not contain it, and for a double backward
    (``create_graph=True``) through a synchronised layer.

    Example:
        >>> try:
        ...     model(batch).sum().backward()
        ... except syncnorm.SyncNormError as error:
        ...     print(error)  # names the layer, e.g. 'layer3.1.bn2', and what differed between ranks
        ...     raise
    """
