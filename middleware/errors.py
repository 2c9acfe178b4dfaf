"""The lmgate error tree and the one place that renders it (the tree is drawn in docs/errors.md).

Every failure lmgate reports to a client is an ``LmgateError``. As in httpx's ``HTTPError`` tree,
a base, a few families and leaves with a stable ``code``::

    LmgateError                   500 internal_error (base)
    ├── ClientError               4xx: the request is at fault
    │   ├── BadRequest            400 bad_request
    │   ├── Unauthorized          401 invalid_api_key
    │   ├── NotFound              404 not_found
    │   ├── RequestTimeout        408 request_timeout (the body stalled)
    │   └── PayloadTooLarge       413 payload_too_large
    ├── Overload                  lmgate sheds load to protect the upstream: never retried, no fault
    │   ├── RateLimited           429 rate_limited
    │   ├── Overloaded            503 overloaded
    │   ├── Draining              503 draining
    │   └── CircuitOpen           503 circuit_open
    ├── Timeout                   504: a deadline passed (an upstream fault)
    │   ├── GatewayTimeout        504 timeout (lmgate's own deadline)
    │   └── UpstreamTimeout       504 upstream_timeout (also an UpstreamError; retryable)
    ├── UpstreamError             502: the upstream failed (an upstream fault)
    │   ├── UpstreamUnavailable   502 upstream_unavailable (retryable)
    │   ├── UpstreamProtocolError 502 upstream_protocol_error
    │   └── StreamCut             502 stream_cut
    ├── Cancelled                 499: nothing can be sent
    │   └── ClientDisconnected    499 client_cancelled
    └── InternalError             500 internal_error

Packages add leaves to these families, never new families: ``middleware.auth.Forbidden``
(ClientError), and in the gateway ``ModelLoading`` (Overload), ``ModelLoadFailed`` and
``UpstreamReported`` (UpstreamError).

Layers raise these and decide from their types and attributes (``retryable``,
``upstream_fault``), never from rendered headers. Foreign exceptions (httpx, anyio) are translated
where they are caught, with ``raise ... from exc``. Only the outermost error layer renders:

* before the response has started: an HTTP response with the OpenAI error body
  ``{"error": {"message", "type", "code"}}``, an ``X-Lmgate-Error: <code>`` header and, where the
  error knows one, ``Retry-After``;
* after an event stream has started: an SSE error frame (``event: error`` + ``data: {...}``) that
  ends the stream, so a client never mistakes a cut stream for a finished one. A non-SSE body that
  has started cannot carry an error: the transfer is aborted instead (the exception propagates and
  the server drops the connection without the final chunk).

``ErrorMiddleware`` marks the scope; a layer used without it (no mark) renders its own errors
(``raise_or_render``), and a layer that decides on the errors raised inside it (retry, the
breaker) becomes the error layer for what it wraps (``with_error_layer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable

from middleware.disconnect import disconnect_signal
from middleware.request_id import request_id
from middleware.response import ResponseState
from middleware.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("lmgate")

__all__ = [
    "BadRequest",
    "Cancelled",
    "CircuitOpen",
    "ClientDisconnected",
    "ClientError",
    "Draining",
    "ErrorMiddleware",
    "GatewayTimeout",
    "InternalError",
    "LmgateError",
    "NotFound",
    "Overload",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "StreamCut",
    "Timeout",
    "Unauthorized",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
    "error_layer_outside",
    "raise_or_render",
    "send_error",
    "sse_error_frame",
    "with_error_layer",
]


class LmgateError(Exception):
    """Base class: a failure with an HTTP status, an OpenAI error type and a stable code.

    Class attributes describe the kind of failure; the instance carries the message and, where it
    applies, how many seconds the client should wait before trying again.
    """

    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"
    #: Another attempt at the same upstream may succeed (retry middleware).
    retryable: bool = False
    #: The upstream misbehaved (circuit breaker counts it). Client faults and our own refusals do not.
    upstream_fault: bool = False
    default_message: str = "lmgate failed to handle the request"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: float | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.message = message or self.default_message
        self.retry_after_s = retry_after_s
        self.extra_headers = tuple(headers)
        super().__init__(self.message)

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", b"application/json"),
            (b"x-lmgate-error", self.code.encode("ascii")),
        ]
        if self.retry_after_s is not None:
            seconds = max(1, math.ceil(self.retry_after_s))
            headers.append((b"retry-after", str(seconds).encode("ascii")))
        headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.extra_headers)
        return headers


# --- families -------------------------------------------------------------------------------------


class ClientError(LmgateError):
    """The request is at fault (4xx). Never retried; says nothing about the upstream's health."""

    status, code, type = 400, "bad_request", "invalid_request_error"


class Overload(LmgateError):
    """lmgate refuses, to protect the upstream or itself. Another attempt now would be refused too
    or add the load the refusal sheds: never retried, and no upstream fault."""

    status, code, type = 503, "overloaded", "server_error"


class Timeout(LmgateError):
    """A deadline passed before the upstream answered (or finished answering)."""

    status, code, type = 504, "timeout", "timeout_error"
    upstream_fault = True


class UpstreamError(LmgateError):
    """The upstream failed: unreachable, too slow, or answering what lmgate cannot relay."""

    status, code, type = 502, "upstream_error", "server_error"
    upstream_fault = True


class Cancelled(LmgateError):
    """The request ended from the client's side. Nothing can be sent; raised so layers can account
    for it. (Not anyio's cancellation, which is never caught.)"""

    status, code, type = 499, "client_cancelled", "invalid_request_error"


# --- the client's fault -------------------------------------------------------------------------


class BadRequest(ClientError):
    status, code, type = 400, "bad_request", "invalid_request_error"
    default_message = "The request is malformed."


class Unauthorized(ClientError):
    status, code, type = 401, "invalid_api_key", "authentication_error"
    default_message = "A valid API key is required: send 'Authorization: Bearer <key>'."


class NotFound(ClientError):
    status, code, type = 404, "not_found", "invalid_request_error"
    default_message = "No such route on this gateway."


class PayloadTooLarge(ClientError):
    status, code, type = 413, "payload_too_large", "invalid_request_error"
    default_message = "The request body is larger than this gateway accepts."


class RequestTimeout(ClientError):
    """The client stopped sending its request body; the connection is closed after the answer."""

    status, code, type = 408, "request_timeout", "invalid_request_error"
    default_message = "The request body did not arrive in time."

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().response_headers(), (b"connection", b"close")]


class ClientDisconnected(Cancelled):
    """The client went away. Nothing can be sent; raised so layers can account for it."""

    status, code, type = 499, "client_cancelled", "invalid_request_error"
    default_message = "The client closed the connection."


# --- lmgate refuses, to protect the upstream ------------------------------------------------------


class RateLimited(Overload):
    status, code, type = 429, "rate_limited", "rate_limit_error"
    default_message = "Too many concurrent requests for this key; try again later."


class Overloaded(Overload):
    status, code, type = 503, "overloaded", "server_error"
    default_message = "The upstream is at its concurrency limit and the queue is full; try again later."


class Draining(Overload):
    status, code, type = 503, "draining", "server_error"
    default_message = "This gateway is shutting down; retry on another instance."

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().response_headers(), (b"connection", b"close")]


class CircuitOpen(Overload):
    status, code, type = 503, "circuit_open", "server_error"
    default_message = "The upstream is failing; lmgate is not sending it requests for now."


# --- deadlines and upstream failures --------------------------------------------------------------


class GatewayTimeout(Timeout):
    """One of lmgate's own deadlines (first token, idle, total) passed. Not retried: it covers the
    retries already."""

    status, code, type = 504, "timeout", "timeout_error"
    default_message = "The upstream did not answer in time."


class UpstreamTimeout(Timeout, UpstreamError):
    status, code, type = 504, "upstream_timeout", "timeout_error"
    retryable = True
    default_message = "The upstream did not answer in time."


class UpstreamUnavailable(UpstreamError):
    status, code, type = 502, "upstream_unavailable", "server_error"
    retryable = True
    default_message = "The upstream could not be reached."


class UpstreamProtocolError(UpstreamError):
    status, code, type = 502, "upstream_protocol_error", "server_error"
    default_message = "The upstream sent a response lmgate could not understand."


class StreamCut(UpstreamError):
    status, code, type = 502, "stream_cut", "server_error"
    default_message = "The upstream closed the stream before it finished."


class InternalError(LmgateError):
    status, code, type = 500, "internal_error", "server_error"
    default_message = "lmgate hit an unexpected error; it has been logged."


# --- rendering ------------------------------------------------------------------------------------


def error_body(error: LmgateError) -> bytes:
    return json.dumps(error.to_dict(), separators=(",", ":")).encode()


def sse_error_frame(error: LmgateError) -> bytes:
    """An SSE frame that official OpenAI clients raise as an APIError instead of a clean end."""
    return b"event: error\ndata: " + error_body(error) + b"\n\n"


async def send_error(send: Send, error: LmgateError, response: ResponseState) -> None:
    """Report ``error`` in the only shape still possible given what ``response`` has sent.

    Raises ``error`` again when the response is a started non-SSE body: the only honest signal left
    is an aborted transfer.
    """
    if not response.started:
        body = error_body(error)
        headers = error.response_headers()
        headers.append((b"content-length", str(len(body)).encode("ascii")))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif response.finished:
        return
    elif response.event_stream:
        # End a frame the upstream left half-written first, so ours is parsed on its own.
        frame = sse_error_frame(error) if response.at_frame_boundary else b"\n\n" + sse_error_frame(error)
        await send({"type": "http.response.body", "body": frame, "more_body": False})
    else:
        raise error


#: Scope key: a layer further out renders (or decides on) the LmgateErrors raised inside it.
_ERROR_LAYER = "lmgate.error_layer"


def error_layer_outside(scope: Scope) -> bool:
    """Whether a layer further out handles an ``LmgateError`` raised here (read it on entry)."""
    return bool(scope.get(_ERROR_LAYER))


async def raise_or_render(error: LmgateError, send: Send, response: ResponseState, *, outside: bool) -> None:
    """Raise ``error`` for the error layer further out; with none (``outside`` False), render it.

    For a layer's own errors (a refusal, a deadline), so the layer used alone still answers.
    """
    if outside:
        raise error
    await send_error(send, error, response)


async def with_error_layer(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Call ``app`` as the error layer for what it wraps: for a layer used alone that decides on
    the errors raised inside it (retry, the breaker), so inner layers raise rather than render.

    An ``LmgateError`` that arrives before the response started is rendered here; after it started,
    it propagates (a layer further out, or the server, ends the transfer), and so do a client that
    left and unknown exceptions.
    """
    scope[_ERROR_LAYER] = True
    response = ResponseState()

    async def tracking_send(message: Message) -> None:
        response.observe(message)
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except LmgateError as error:
        if response.started or isinstance(error, Cancelled):
            raise
        await send_error(tracking_send, error, response)


class ErrorMiddleware:
    """Outermost layer: renders any ``LmgateError`` and turns unknown exceptions into a logged 500.

    Cancellation is never caught. A client that left (``ClientDisconnected``) gets nothing. An
    unknown exception is logged with the request id, answered with 500 ``internal_error`` where a
    response can still carry it, and re-raised, as Starlette's ``ServerErrorMiddleware`` does: the
    server logs it too, and a test client sees it.

    Once any layer has received ``http.disconnect``, nothing more is written: sends return at once.
    The inner layers still see the disconnect and stop on their own (the proxy closes the upstream),
    but the chunks they send meanwhile no longer reach a closed socket, where hypercorn writes them
    anyway and asyncio logs "socket.send() raised exception." for each (tens of thousands of lines
    per overload). Servers also report ``http.disconnect`` after a complete response, when nothing
    is left to send.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[_ERROR_LAYER] = True
        response = ResponseState()
        client_left = False
        # With a server's DisconnectSignal nothing may ever read http.disconnect from receive():
        # the signal says the client left.
        signal = disconnect_signal(scope)

        async def watching_receive() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect":
                client_left = True
            return message

        async def tracking_send(message: Message) -> None:
            if client_left or (signal is not None and signal.is_set):
                return  # nobody to write to (see the class docstring)
            response.observe(message)
            await send(message)

        try:
            await self.app(scope, watching_receive, tracking_send)
        except Cancelled:
            return
        except LmgateError as error:
            await send_error(tracking_send, error, response)
        except Exception:
            logger.exception(
                "unhandled error while serving %s %s",
                scope.get("method"),
                scope.get("path"),
                extra={"event": "unhandled_error", "request_id": request_id(scope)},
            )
            with contextlib.suppress(InternalError):  # a started plain body: the re-raise below aborts it
                await send_error(tracking_send, InternalError(), response)
            raise
