"""Error categories, and the structured log events of a request's life.

An operator asks "why did it fail?" in a few words, not in lmgate's two dozen error codes: each
failure gets one ``error_category`` from :data:`CATEGORIES` (users' "auth vs network vs
other", refined), derived from the stable error code when there is one, else from the status.
The code itself is logged too (``error_code``) for the precise story.

Log events, one JSON line each (see ``gateway.telemetry.logs`` for the stamps every line carries):

* ``gen_request``: request_id, model, stream, prompt_chars, attempt, timeout_ms, route
* ``gen_success``: latency_ms, ttft_ms, tokens_in, tokens_out (with tokens_in_source, tokens_out_source:
  upstream, counted or estimated), tokens_per_s, attempts, model_state, upstream (the one that served it)
* ``gen_error``: latency_ms, attempt, error_category, error_code, status, message, upstream (when one was chosen)
* ``model_load``: model, load_ms, outcome, upstream

Prompt text appears (as ``prompt`` on ``gen_request``) only with ``logging.prompts: true``.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("lmgate.telemetry")

CATEGORIES = (
    "auth",
    "network",
    "timeout",
    "upstream_5xx",
    "context_overflow",
    "model_not_found",
    "model_load_failed",
    "overloaded",
    "circuit_open",
    "client_cancelled",
    "stream_cut",
    "bad_request",
    "internal",
)

_BY_CODE = {
    "invalid_api_key": "auth",
    "upstream_unavailable": "network",
    "upstream_protocol_error": "network",
    "timeout": "timeout",
    "upstream_timeout": "timeout",
    "upstream_error": "upstream_5xx",
    "model_unloaded": "upstream_5xx",
    "model_crashed": "upstream_5xx",
    "context_length_exceeded": "context_overflow",
    "model_not_found": "model_not_found",
    "model_not_loaded": "model_not_found",
    "model_load_failed": "model_load_failed",
    # lmgate's refusals to protect the upstream: the client should come back later or elsewhere.
    "overloaded": "overloaded",
    "rate_limited": "overloaded",
    "draining": "overloaded",
    "model_loading": "overloaded",
    "circuit_open": "circuit_open",
    "client_cancelled": "client_cancelled",
    "stream_cut": "stream_cut",
    "bad_request": "bad_request",
    "payload_too_large": "bad_request",
    "not_found": "bad_request",
    "upstream_rejected": "bad_request",
    "internal_error": "internal",
}


def categorise(code: str | None, status: int) -> str:
    """The category of a failure with error ``code`` (may be None) and HTTP ``status``."""
    category = _BY_CODE.get(code) if code is not None else None
    if category is not None:
        return category
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "overloaded"
    if status >= 500:
        return "upstream_5xx"
    return "bad_request"


def log_request(fields: dict[str, Any]) -> None:
    logger.info("%s %s", fields.get("route"), fields.get("model") or "", extra={"event": "gen_request", **fields})


def log_success(fields: dict[str, Any]) -> None:
    logger.info(
        "%s %s answered in %s ms",
        fields.get("route"),
        fields.get("model") or "",
        fields.get("latency_ms"),
        extra={"event": "gen_success", **fields},
    )


def log_error(message: str, fields: dict[str, Any]) -> None:
    # A client that left is its own decision, not a fault to page anyone about.
    level = logging.INFO if fields.get("error_category") == "client_cancelled" else logging.WARNING
    logger.log(level, "%s", message, extra={"event": "gen_error", **fields})


def log_model_load(
    model: str, load_s: float, *, ok: bool, request_id: str | None, error: str | None, upstream: str | None = None
) -> None:
    fields: dict[str, Any] = {"model": model, "load_ms": round(load_s * 1000), "outcome": "ok" if ok else "failed"}
    if upstream is not None:
        fields["upstream"] = upstream
    if request_id is not None:
        fields["request_id"] = request_id
    if error:
        fields["error"] = error
    level = logging.INFO if ok else logging.WARNING
    where = f" on {upstream}" if upstream is not None else ""
    logger.log(level, "model %s %s%s in %.1f s", model, "loaded" if ok else "failed to load", where, load_s,
               extra={"event": "model_load", **fields})
