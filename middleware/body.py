"""Read a request body once, cap it, and let every layer replay it.

Several layers need the body before the terminal app: the concurrency limiter and the timeout read
the ``model`` to apply per-model settings, and retry replays the body to each attempt. The first
layer that calls :func:`read_body` receives it from the server (up to a limit) and caches it, with
the server's original ``receive``, in ``scope["state"]``. Any layer can then hand its inner app
:func:`replaying_receive`: the cached body first, then the server's own channel (where only
``http.disconnect`` is left to arrive). Replaying always delegates to the *server's* receive, never
to another replay, so nested layers cannot deliver the body twice.
"""

from __future__ import annotations

import json

from middleware.errors import BadRequest, ClientDisconnected, PayloadTooLarge
from middleware.types import Message, Receive, Scope

_BODY = "lmgate.body"
_TRANSPORT_RECEIVE = "lmgate.transport_receive"
_MODEL = "lmgate.model"
_JSON = "lmgate.json"
_MISSING = object()

DEFAULT_LIMIT_BYTES = 10 * 1024 * 1024
# A body refused as too large is still read (and dropped) up to this much before the 413 goes out:
# a server that answers and closes while the client is still uploading makes the kernel reset the
# connection, and the client never sees the 413. Past it, the reset is the cheaper evil.
_DISCARD_LIMIT_BYTES = 64 * 1024 * 1024


async def read_body(scope: Scope, receive: Receive, *, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> bytes:
    """Return the whole request body, reading it from the server on the first call only.

    Raises ``PayloadTooLarge`` past ``limit_bytes`` (checked against ``Content-Length`` before
    reading anything) and ``ClientDisconnected`` when the client leaves mid-upload.
    """
    state = scope.setdefault("state", {})
    cached = state.get(_BODY)
    if cached is not None:
        return cached
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise BadRequest("Content-Length is not a number.") from None
            if declared > limit_bytes:
                if declared <= _DISCARD_LIMIT_BYTES:
                    await _discard(receive, _DISCARD_LIMIT_BYTES)
                raise PayloadTooLarge(f"The request body is larger than {limit_bytes} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit_bytes:
                if message.get("more_body", False):
                    await _discard(receive, _DISCARD_LIMIT_BYTES - size)
                raise PayloadTooLarge(f"The request body is larger than {limit_bytes} bytes.")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    state[_BODY] = body
    state[_TRANSPORT_RECEIVE] = receive
    return body


async def _discard(receive: Receive, limit_bytes: int) -> None:
    """Read the rest of a refused body and drop it, up to ``limit_bytes``."""
    dropped = 0
    while dropped <= limit_bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def replaying_receive(scope: Scope, receive: Receive) -> Receive:
    """A ``receive`` for an inner app: the cached body once, then the server's channel.

    Before :func:`read_body` has run this is ``receive`` itself.
    """
    state = scope.get("state") or {}
    body = state.get(_BODY)
    if body is None:
        return receive
    transport: Receive = state[_TRANSPORT_RECEIVE]
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await transport()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def request_json(scope: Scope) -> dict | None:
    """The body parsed as a JSON object, or None (no body read yet, not JSON, not an object)."""
    state = scope.get("state") or {}
    parsed = state.get(_JSON, _MISSING)
    if parsed is not _MISSING:
        return parsed  # type: ignore[return-value]
    body = state.get(_BODY)
    if body is None:
        return None
    try:
        value = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting is bad input, not a bug
        value = None
    parsed = value if isinstance(value, dict) else None
    state[_JSON] = parsed
    return parsed


def request_model(scope: Scope) -> str | None:
    """The ``model`` named in the JSON body, once some layer has read the body."""
    state = scope.get("state") or {}
    model = state.get(_MODEL, _MISSING)
    if model is _MISSING:
        body = request_json(scope)
        value = body.get("model") if body is not None else None
        model = value if isinstance(value, str) and value else None
        state[_MODEL] = model
    return model  # type: ignore[return-value]


async def model_of(scope: Scope, receive: Receive, *, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> str | None:
    """Read the body if needed and return its ``model`` (None for GET and bodies without one)."""
    if scope.get("method", "GET") in ("GET", "HEAD", "OPTIONS"):
        return None
    await read_body(scope, receive, limit_bytes=limit_bytes)
    return request_model(scope)
