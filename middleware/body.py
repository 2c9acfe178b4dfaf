"""Read a request body once, cap it, and hand it on to every layer as one typed object.

Several layers need the body before the terminal app: the concurrency limiter and the timeout read
the ``model`` to apply per-model settings, and retry replays the body to each attempt. The first
layer that calls :func:`read_body` receives it from the server (up to a limit) and stores a
:class:`RequestBody` (the bytes, the server's original ``receive``, the JSON parsed once on first
use) in ``scope["state"]`` under :data:`REQUEST_BODY_KEY`, the only key this module uses. Any layer
can then hand its inner app :func:`replaying_receive`: the stored body first, then the server's own
channel (where only ``http.disconnect`` is left to arrive). Replaying always delegates to the
*server's* receive, never to another replay, so nested layers cannot deliver the body twice.

Every limit is checked against the body, whoever read it: a layer that passes ``limit_bytes``
smaller than a body an outer layer already accepted gets ``PayloadTooLarge`` just as if it had read
the body itself (retry turns that into "too large to replay: one attempt").

:class:`BodyDeadlines`, outside every layer that reads a body, bounds how long a body may take to
arrive, whichever layer reads it; and :func:`read_body` refuses a body whose length is ambiguous before
reading any of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import anyio

from middleware.errors import (
    BadRequest,
    ClientDisconnected,
    PayloadTooLarge,
    RequestTimeout,
)
from middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DEFAULT_LIMIT_BYTES",
    "REQUEST_BODY_KEY",
    "BodyDeadlines",
    "RequestBody",
    "model_of",
    "read_body",
    "replaying_receive",
    "request_body",
    "request_json",
    "request_model",
]

#: The ``scope["state"]`` key of the :class:`RequestBody`, set by the first layer that reads it.
REQUEST_BODY_KEY = "lmgate.request_body"

DEFAULT_LIMIT_BYTES = 10 * 1024 * 1024
# A body refused as too large is still read (and dropped) up to this much before the 413 goes out:
# a server that answers and closes while the client is still uploading makes the kernel reset the
# connection, and the client never sees the 413. Past it, the reset is the cheaper evil.
_DISCARD_LIMIT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class RequestBody:
    """A request body read whole: its bytes, and the server's ``receive`` it was read from.

    ``json`` and ``model`` are worked out on first use and kept (a frozen dataclass still lets
    ``cached_property`` store into the instance dict).
    """

    raw: bytes
    transport_receive: Receive = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.raw)

    @cached_property
    def json(self) -> dict[str, Any] | None:
        """The body parsed as a JSON object, or None (empty, not JSON, not an object)."""
        try:
            value = json.loads(self.raw) if self.raw else None
        except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting is bad input, not a bug
            return None
        return value if isinstance(value, dict) else None

    @cached_property
    def model(self) -> str | None:
        """The non-empty ``model`` string of the JSON body, or None."""
        value = self.json.get("model") if self.json is not None else None
        return value if isinstance(value, str) and value else None


def request_body(scope: Scope) -> RequestBody | None:
    """The body some layer has read already, or None."""
    body = (scope.get("state") or {}).get(REQUEST_BODY_KEY)
    return body if isinstance(body, RequestBody) else None


async def read_body(scope: Scope, receive: Receive, *, limit_bytes: int | None = None) -> bytes:
    """Return the whole request body, reading it from the server on the first call only.

    Raises ``PayloadTooLarge`` past ``limit_bytes`` (checked against ``Content-Length`` before
    reading anything, and against a body an outer layer read already), ``BadRequest`` for a body
    framed by both ``Content-Length`` and ``Transfer-Encoding`` (before reading anything), and
    ``ClientDisconnected`` when the client leaves mid-upload. Without ``limit_bytes``, the first
    reader applies ``DEFAULT_LIMIT_BYTES`` and a later one accepts what the first accepted.
    """
    state = scope.setdefault("state", {})
    cached = request_body(scope)
    if cached is not None:
        if limit_bytes is not None and cached.size > limit_bytes:
            raise PayloadTooLarge(f"The request body is larger than {limit_bytes} bytes.")
        return cached.raw
    if limit_bytes is None:
        limit_bytes = DEFAULT_LIMIT_BYTES
    headers = scope.get("headers", ())
    if any(key == b"transfer-encoding" for key, _ in headers) and any(key == b"content-length" for key, _ in headers):
        # RFC 9112 §6.1: a request smuggling vector. Refused before the body is read, or a client
        # that sends no body would hold the connection until the body deadline.
        raise BadRequest("The request has both Content-Length and Transfer-Encoding.", headers=[("Connection", "close")])
    for key, value in headers:
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
    body = RequestBody(b"".join(chunks), receive)
    state[REQUEST_BODY_KEY] = body
    return body.raw


async def _discard(receive: Receive, limit_bytes: int) -> None:
    """Read the rest of a refused body and drop it, up to ``limit_bytes`` or its deadline."""
    dropped = 0
    try:
        while dropped <= limit_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
    except RequestTimeout:
        return  # the body is refused anyway: the client still learns why (413), not only that it was slow


class BodyDeadlines:
    """A request body must keep coming (``idle_s`` between pieces) and be whole within ``total_s``.

    hypercorn cuts a client that trickles its headers (after its keep-alive timeout), but once the
    headers are in, a body that never comes would hold the connection, and whatever layer waits
    for it, for ever. This layer wraps ``receive`` so that every reader of the body is bound by the
    deadlines, and answers 408 ``request_timeout`` with ``Connection: close`` when one passes. The
    clocks run only while a layer waits for the body: the first wait starts the total, so a body
    lmgate is slow to read is never blamed on the client. Once the body is whole, ``receive`` is
    passed through untouched (the proxy waits on it for ``http.disconnect``).
    """

    def __init__(self, app: ASGIApp, *, idle_s: float, total_s: float) -> None:
        if idle_s <= 0 or total_s <= 0:
            raise ValueError("body deadlines must be positive")
        self.app = app
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, self._receive_in_time(receive), send)

    def _receive_in_time(self, receive: Receive) -> Receive:
        idle_s, total_s = self.idle_s, self.total_s
        whole = False
        total_deadline: float | None = None

        async def receive_in_time() -> Message:
            nonlocal whole, total_deadline
            if whole:
                return await receive()
            now = anyio.current_time()
            if total_deadline is None:
                total_deadline = now + total_s
            wait = min(idle_s, total_deadline - now)
            message: Message | None = None
            if wait > 0:
                with anyio.move_on_after(wait):
                    message = await receive()
            if message is None:
                if wait < idle_s:
                    raise RequestTimeout(f"The request body did not arrive whole within {total_s:g} s.")
                raise RequestTimeout(f"The request body stopped arriving: nothing for {idle_s:g} s.")
            if message["type"] != "http.request" or not message.get("more_body", False):
                whole = True
            return message

        return receive_in_time


def replaying_receive(scope: Scope, receive: Receive) -> Receive:
    """A ``receive`` for an inner app: the stored body once, then the server's channel.

    Before :func:`read_body` has run this is ``receive`` itself.
    """
    body = request_body(scope)
    if body is None:
        return receive
    transport = body.transport_receive
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await transport()
        delivered = True
        return {"type": "http.request", "body": body.raw, "more_body": False}

    return replay


def request_json(scope: Scope) -> dict[str, Any] | None:
    """The body parsed as a JSON object, or None (no body read yet, not JSON, not an object)."""
    body = request_body(scope)
    return body.json if body is not None else None


def request_model(scope: Scope) -> str | None:
    """The ``model`` named in the JSON body, once some layer has read the body."""
    body = request_body(scope)
    return body.model if body is not None else None


async def model_of(scope: Scope, receive: Receive, *, limit_bytes: int | None = None) -> str | None:
    """Read the body if needed and return its ``model`` (None for GET and bodies without one)."""
    if scope.get("method", "GET") in ("GET", "HEAD", "OPTIONS"):
        return None
    await read_body(scope, receive, limit_bytes=limit_bytes)
    return request_model(scope)
