"""The router's own refusals, in the one error tree (middleware/errors.py; docs/errors.md)."""

from __future__ import annotations

from middleware.errors import NotFound, UpstreamUnavailable


class ModelNotFound(NotFound):
    """No upstream lists the model the request names (LM Studio's ``model_not_found`` shape)."""

    status, code, type = 404, "model_not_found", "invalid_request_error"
    default_message = "No upstream has this model."

    def to_dict(self) -> dict[str, dict[str, object]]:
        document = super().to_dict()
        document["error"]["param"] = "model"
        return document


class NoUpstreamAnswered(UpstreamUnavailable):
    """No upstream that answered lists the model, and some did not answer: it may be on one of them."""

    status, code, type = 503, "upstream_unavailable", "server_error"
    retryable = False  # the router has asked every upstream already
    default_message = "The upstreams that could have this model did not answer."
