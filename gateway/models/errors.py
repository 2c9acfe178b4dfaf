"""The cold-start layer's leaves of lmgate's error tree (``middleware.errors``; docs/errors.md).

They live with the model layers, not in ``middleware/``: a model load is a gateway concept, and
the tree's families are enough for every layer in ``middleware/`` to decide on them.
"""

from __future__ import annotations

from middleware.errors import Overload, UpstreamError

__all__ = ["ModelLoadFailed", "ModelLoading"]


class ModelLoading(Overload):
    """The model is still loading and ``models.on_loading`` is ``reject``: come back later."""

    status, code, type = 503, "model_loading", "server_error"
    default_message = "The model is loading; try again shortly."


class ModelLoadFailed(UpstreamError):
    """The upstream could not load the model the request names."""

    status, code, type = 502, "model_load_failed", "server_error"
    default_message = "The upstream failed to load the model."
