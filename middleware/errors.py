"""The lmgate error hierarchy and the one place that renders it.

Every failure lmgate reports to a client is an ``LmgateError``. Foreign exceptions (httpx, anyio,
aiobreaker) are translated into one of these at the boundary where they are caught, with
``raise ... from exc``, so the cause stays in the traceback. Rendering happens in exactly two shapes:

* before the response has started: an HTTP response with the OpenAI error body
  ``{"error": {"message", "type", "code"}}``, an ``X-Lmgate-Error: <code>`` header and, where the
  error knows one, ``Retry-After``;
* after an event stream has started: an SSE error frame (``event: error`` + ``data: {...}``) that
  ends the stream, so a client never mistakes a cut stream for a finished one. A non-SSE body that
  has started cannot carry an error: the transfer is aborted instead (the exception propagates and
  the server drops the connection without the final chunk).

This module lives in ``middleware/`` because every middleware raises these errors and
``middleware/`` must not import ``gateway/``; ``gateway.errors`` re-exports it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable

from middleware.request_id import request_id
from middleware.response import ResponseState
from middleware.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("lmgate")

__all__ = [
    "BadRequest",
    "CircuitOpen",
    "ClientDisconnected",
    "Draining",
    "ErrorMiddleware",
    "GatewayTimeout",
    "InternalError",
    "LmgateError",
    "ModelLoadFailed",
    "ModelLoading",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "StreamCut",
    "Unauthorized",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
    "send_error",
    "sse_error_frame",
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

    def to_dict(self) -> dict[str, object]:
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


# --- the client's fault -------------------------------------------------------------------------


class BadRequest(LmgateError):
    status, code, type = 400, "bad_request", "invalid_request_error"
    default_message = "The request is malformed."


class Unauthorized(LmgateError):
    status, code, type = 401, "invalid_api_key", "authentication_error"
    default_message = "A valid API key is required: send 'Authorization: Bearer <key>'."


class NotFound(LmgateError):
    status, code, type = 404, "not_found", "invalid_request_error"
    default_message = "No such route on this gateway."


class PayloadTooLarge(LmgateError):
    status, code, type = 413, "payload_too_large", "invalid_request_error"
    default_message = "The request body is larger than this gateway accepts."


class RequestTimeout(LmgateError):
    """The client stopped sending its request body; the connection is closed after the answer."""

    status, code, type = 408, "request_timeout", "invalid_request_error"
    default_message = "The request body did not arrive in time."

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().response_headers(), (b"connection", b"close")]


class RateLimited(LmgateError):
    status, code, type = 429, "rate_limited", "rate_limit_error"
    default_message = "Too many concurrent requests for this key; try again later."


class ClientDisconnected(LmgateError):
    """The client went away. Nothing can be sent; raised so layers can account for it."""

    status, code, type = 499, "client_cancelled", "invalid_request_error"
    default_message = "The client closed the connection."


# --- lmgate refuses, to protect the upstream ------------------------------------------------------


class Overloaded(LmgateError):
    status, code, type = 503, "overloaded", "server_error"
    default_message = "The upstream is at its concurrency limit and the queue is full; try again later."


class Draining(LmgateError):
    status, code, type = 503, "draining", "server_error"
    default_message = "This gateway is shutting down; retry on another instance."

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().response_headers(), (b"connection", b"close")]


class CircuitOpen(LmgateError):
    status, code, type = 503, "circuit_open", "server_error"
    default_message = "The upstream is failing; lmgate is not sending it requests for now."


class GatewayTimeout(LmgateError):
    status, code, type = 504, "timeout", "timeout_error"
    upstream_fault = True
    default_message = "The upstream did not answer in time."


class ModelLoading(LmgateError):
    status, code, type = 503, "model_loading", "server_error"
    default_message = "The model is loading; try again shortly."


# --- the upstream failed --------------------------------------------------------------------------


class UpstreamUnavailable(LmgateError):
    status, code, type = 502, "upstream_unavailable", "server_error"
    retryable = True
    upstream_fault = True
    default_message = "The upstream could not be reached."


class UpstreamTimeout(LmgateError):
    status, code, type = 504, "upstream_timeout", "timeout_error"
    retryable = True
    upstream_fault = True
    default_message = "The upstream did not answer in time."


class UpstreamProtocolError(LmgateError):
    status, code, type = 502, "upstream_protocol_error", "server_error"
    upstream_fault = True
    default_message = "The upstream sent a response lmgate could not understand."


class StreamCut(LmgateError):
    status, code, type = 502, "stream_cut", "server_error"
    upstream_fault = True
    default_message = "The upstream closed the stream before it finished."


class ModelLoadFailed(LmgateError):
    status, code, type = 502, "model_load_failed", "server_error"
    upstream_fault = True
    default_message = "The upstream failed to load the model."


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


class ErrorMiddleware:
    """Outermost layer: renders any ``LmgateError`` and turns unknown exceptions into a logged 500.

    Cancellation is never caught. A client that left (``ClientDisconnected``) gets nothing. An
    unknown exception is logged with the request id and answered with 500 ``internal_error``; it
    never propagates to the server, so one bad request cannot take the process down.

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
        response = ResponseState()
        client_left = False

        async def watching_receive() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect":
                client_left = True
            return message

        async def tracking_send(message: Message) -> None:
            if client_left:
                return  # nobody to write to (see the class docstring)
            response.observe(message)
            await send(message)

        try:
            await self.app(scope, watching_receive, tracking_send)
        except ClientDisconnected:
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
            await send_error(tracking_send, InternalError(), response)
