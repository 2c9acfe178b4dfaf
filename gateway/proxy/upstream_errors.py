"""Translations into lmgate's error tree (``middleware.errors``) at the upstream boundary.

* :func:`translate_transport_error` maps an httpx failure to an ``LmgateError`` depending on
  whether the client's response has started;
* :func:`normalise_error_body` rewrites LM Studio's ``{"error": "text"}`` bodies into the OpenAI
  shape and gives each known LM Studio message a stable code (:func:`classify_upstream_message`);
* :class:`UpstreamReported` is an error the upstream reported inside a stream lmgate consumed.

The tree, every code and how each renders: docs/errors.md.
"""

from __future__ import annotations

import json

import httpx

from middleware.errors import (
    LmgateError,
    Overloaded,
    StreamCut,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = [
    "POOL_RETRY_AFTER_S",
    "UpstreamReported",
    "classify_upstream_message",
    "describe",
    "normalise_error_body",
    "translate_transport_error",
]


class UpstreamReported(UpstreamError):
    """An error the upstream reported inside a stream that lmgate consumed itself (assembly).

    Status, code and type come from the upstream's message, mirroring what the upstream answers
    for the same failure without streaming (400 for a context overflow, for example).
    """

    def __init__(self, message: str, *, status: int, code: str, type: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.type = type
        self.upstream_fault = status >= 500

    @classmethod
    def from_message(cls, message: str) -> UpstreamReported:
        code, kind = classify_upstream_message(message, 500)
        status = 400 if kind == "invalid_request_error" else 502
        return cls(message, status=status, code=code, type=kind)


#: Retry-After for a request refused because the upstream pool stayed full (the queue's default).
POOL_RETRY_AFTER_S = 5.0


def translate_transport_error(exc: httpx.HTTPError, *, response_started: bool) -> LmgateError:
    """The ``LmgateError`` for an httpx failure talking to the upstream.

    Once the client's response has started, every transport failure means the stream was cut.
    """
    if response_started:
        return StreamCut(f"The upstream stream was cut: {describe(exc)}")
    if isinstance(exc, httpx.PoolTimeout):
        # lmgate's own pool stayed full (an explicit upstream.pool.max_connections): a wait in a
        # queue, refused like the concurrency queue's, neither retried nor held against the upstream.
        return Overloaded(
            "No upstream connection came free in time (upstream.pool.max_connections); try again later.",
            retry_after_s=POOL_RETRY_AFTER_S,
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"The upstream timed out: {describe(exc)}")
    if isinstance(exc, httpx.RemoteProtocolError) and not _peer_left(exc):
        # The upstream is reachable and answered, in bytes that are not HTTP (a bad chunk header,
        # a status line that is not one). Not retried: the same server answering the same request
        # again is unlikely to do better, and each attempt may cost a whole generation.
        return UpstreamProtocolError(f"The upstream's answer broke the HTTP protocol: {describe(exc)}")
    if isinstance(exc, httpx.TransportError):
        return UpstreamUnavailable(f"The upstream could not be reached: {describe(exc)}")
    return UpstreamProtocolError(f"The upstream request failed: {describe(exc)}")


# How h11 and httpcore word a protocol error that is really the peer going away (EOF): the
# connection closed before or inside a response. Those stay upstream_unavailable (retried).
_PEER_LEFT_WORDING = ("disconnected", "closed connection")


def _peer_left(exc: httpx.RemoteProtocolError) -> bool:
    """Whether a protocol error is the upstream closing the connection, not a malformed answer."""
    text = str(exc).lower()
    return any(words in text for words in _PEER_LEFT_WORDING)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# LM Studio gives no distinct status or code for these; its message text is the only signal.
_MESSAGE_CODES: tuple[tuple[str, str, str], ...] = (
    ("Trying to keep the first", "context_length_exceeded", "invalid_request_error"),
    ("n_keep", "context_length_exceeded", "invalid_request_error"),
    ("does not fit in context length", "context_length_exceeded", "invalid_request_error"),
    ("Context size has been exceeded", "context_length_exceeded", "invalid_request_error"),
    ("Reached context length", "context_length_exceeded", "invalid_request_error"),
    ("Failed to load model", "model_load_failed", "server_error"),
    ("Model loading was stopped", "model_load_failed", "server_error"),
    ("Model unloaded", "model_unloaded", "server_error"),
    ("No models loaded", "model_not_loaded", "invalid_request_error"),
    ("Invalid model identifier", "model_not_found", "invalid_request_error"),
    ("has crashed", "model_crashed", "server_error"),
    ("Unexpected endpoint or method", "not_found", "invalid_request_error"),
)


def classify_upstream_message(message: str, status: int) -> tuple[str, str]:
    """(code, type) for an upstream error message, by LM Studio's known wording, else by status."""
    for needle, code, kind in _MESSAGE_CODES:
        if needle in message:
            return code, kind
    if status >= 500:
        return "upstream_error", "server_error"
    if status == 401:
        return "invalid_api_key", "authentication_error"
    if status == 429:
        return "rate_limited", "rate_limit_error"
    return "upstream_rejected", "invalid_request_error"


def normalise_error_body(body: bytes, status: int) -> tuple[bytes, str] | None:
    """Rewrite an upstream error body into ``{"error": {"message", "type", "code"}}``.

    Returns the new body and its code, or None when the body is not a JSON object with ``error``
    (it is then passed on untouched). Object-shaped errors keep their fields; a missing ``code``
    or ``type`` is filled in, so every error a client sees has all three.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or "error" not in document:
        return None
    error = document["error"]
    if isinstance(error, str):
        code, kind = classify_upstream_message(error, status)
        normalised: dict[str, object] = {"message": error, "type": kind, "code": code}
    elif isinstance(error, dict):
        message = str(error.get("message") or "")
        code, kind = classify_upstream_message(message, status)
        normalised = dict(error)
        normalised.setdefault("message", message)
        if not normalised.get("code"):
            normalised["code"] = code
        if not normalised.get("type"):
            normalised["type"] = kind
    else:
        return None
    return json.dumps({"error": normalised}, separators=(",", ":")).encode(), str(normalised["code"])
