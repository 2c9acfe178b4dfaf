"""The telemetry layer: observes each forwarded request once, right inside ``ErrorMiddleware``.

On the way in it notes the route, reads the body of inference requests (and hands the inner app
a replay of it) for the model, ``stream`` and the prompt's length, opens the span and logs
``gen_request``. On the way out it sees the response start (status, ``X-Lmgate-Error``), the
first body byte (time to first token), the final body message (where inner layers put their SSE
error frames) and any exception passing through (categorised, then re-raised unchanged). When the
inner app returns or raises, the record becomes one ``gen_success``/``gen_error`` line, the
metric samples and the span's end.

Per chunk it does two dict lookups and a comparison: everything else happens once per request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import Token
from typing import Any, Protocol

import anyio
from opentelemetry.context import Context

from gateway.proxy.sse import ERROR_EVENT_MARKER
from gateway.request.routes import DONE_TERMINATED, route_path
from gateway.telemetry import events
from gateway.telemetry.metrics import GatewayMetrics
from gateway.telemetry.record import (
    NOT_INFERENCE,
    OPERATIONS,
    RECORD_KEY,
    RequestOutcome,
    RequestRecord,
    prompt_text,
    record_of,
    route_label,
)
from gateway.telemetry.stream import client_asked_usage, error_frame_details
from gateway.telemetry.tracing import Tracing, add_event, start_ns
from middleware.body import read_body, replaying_receive, request_json, request_model
from middleware.errors import LmgateError
from middleware.request_id import request_id
from middleware.response import header_value, is_event_stream
from middleware.retry import attempt_number
from middleware.types import ASGIApp, Clock, Message, Receive, Scope, Send

_ERROR_BODY_LIMIT = 64 * 1024
# Set by the cold-start layer on the response start: whether the model was loaded, and the wait.
MODEL_STATE_HEADER = b"x-lmgate-model-state"
LOAD_MS_HEADER = b"x-lmgate-load-ms"

class TelemetryHub(Protocol):
    """What these layers use of ``gateway.telemetry.hub.Telemetry`` (declared here, so the hub,
    which imports ``outcome_of`` from this module, is not imported back)."""

    clock: Clock
    tracing: Tracing | None
    metrics: GatewayMetrics | None
    body_limit_bytes: int
    log_prompts: bool
    request_stream_usage: bool
    first_token_s: Callable[[str | None], float]

    def finish(
        self, scope: Scope, record: RequestRecord, error: BaseException | None, begun: tuple[str, Token[Context] | None] | None
    ) -> None: ...


class TelemetryMiddleware:
    """Logs, metrics and the span of every request through ``app``; see the module docstring."""

    def __init__(self, app: ASGIApp, *, telemetry: TelemetryHub) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hub = self.telemetry
        clock = hub.clock
        path = route_path(scope)
        operation = OPERATIONS.get(path, NOT_INFERENCE)
        record = RequestRecord(clock(), route_label(path), operation)
        scope.setdefault("state", {})[RECORD_KEY] = record
        began_ns = start_ns() if hub.tracing is not None else 0
        error: BaseException | None = None
        begun: tuple[str, Token[Context] | None] | None = None

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                if record.first_byte_at is None and message.get("body"):
                    record.first_byte_at = clock()
                if record.event_stream and not message.get("more_body", False):
                    _note_error_frame(record, message.get("body", b""))
                elif record.status >= 400 and record.error_message is None:
                    _note_error_body(record, message.get("body", b""))
            elif message["type"] == "http.response.start":
                _note_start(record, message)
            await send(message)

        try:
            body: dict[str, Any] | None = None
            if operation != NOT_INFERENCE and scope["method"] == "POST":
                await read_body(scope, receive, limit_bytes=hub.body_limit_bytes)
                receive = replaying_receive(scope, receive)
                body = request_json(scope)
                self._describe(record, scope, body, path)
            begun = self._begin(scope, record, body, began_ns)
            await self.app(scope, receive, observed_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            hub.finish(scope, record, error, begun)

    def _describe(self, record: RequestRecord, scope: Scope, body: dict[str, Any] | None, path: str) -> None:
        record.model = request_model(scope)
        if body is None:
            return
        record.stream = body.get("stream") is True
        text = prompt_text(body)
        record.prompt_chars = len(text)
        if self.telemetry.log_prompts:
            record.prompt = text
        wanted = self.telemetry.request_stream_usage and record.stream and path in DONE_TERMINATED
        record.inject_usage = wanted and not client_asked_usage(body)

    def _begin(
        self, scope: Scope, record: RequestRecord, body: dict[str, Any] | None, began_ns: int
    ) -> tuple[str, Token[Context] | None]:
        """Open the span, count the request in flight, log ``gen_request``; what ``finish`` undoes."""
        hub = self.telemetry
        rid = request_id(scope)
        token = None
        if hub.tracing is not None:
            token = hub.tracing.start(scope, record, start_ns=began_ns, request_id=rid, body=body)
        model_label = hub.metrics.model_label(record.model) if hub.metrics is not None else ""
        if hub.metrics is not None:
            hub.metrics.in_flight.labels(model_label).inc()
        if record.operation != NOT_INFERENCE:
            fields: dict[str, Any] = {
                "request_id": rid,
                "route": record.route,
                "model": record.model,
                "stream": record.stream,
                "prompt_chars": record.prompt_chars,
                "attempt": 1,
                "timeout_ms": round(hub.first_token_s(record.model) * 1000),
            }
            if record.prompt is not None:
                fields["prompt"] = record.prompt
            events.log_request(fields)
        return model_label, token


class AdmissionMark:
    """Notes when a request got past admission (a concurrency slot), for the queue-wait metric.

    Placed right inside the concurrency layer; it costs one attribute write per request.
    """

    def __init__(self, app: ASGIApp, *, telemetry: TelemetryHub) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = record_of(scope)
        if record is not None and record.admitted_at is None:
            record.admitted_at = self.telemetry.clock()
            add_event(record, "lmgate.admitted", {"lmgate.queue_wait_s": record.admitted_at - record.started_at})
        await self.app(scope, receive, send)


def _note_start(record: RequestRecord, message: Message) -> None:
    record.status = message["status"]
    headers = message.get("headers", ())
    record.event_stream = is_event_stream(headers)
    state = header_value(headers, MODEL_STATE_HEADER)
    if state is not None:
        record.model_state = state.decode("latin-1")
        waited_ms = header_value(headers, LOAD_MS_HEADER)
        if waited_ms is not None and waited_ms.isdigit():
            record.model_load_s = int(waited_ms) / 1000
    if record.status >= 400:
        code = header_value(headers, b"x-lmgate-error")
        if code is not None:
            record.note_error(code.decode("latin-1"), None)


def _note_error_body(record: RequestRecord, body: bytes) -> None:
    """The message of an error response (a small JSON document), for the ``gen_error`` line."""
    if not body or len(body) > _ERROR_BODY_LIMIT:
        return
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    if isinstance(message, str) and message:
        record.error_message = message


def _note_error_frame(record: RequestRecord, body: bytes) -> None:
    """Inner layers end a started stream with an SSE error frame as the last message (``send_error``)."""
    at = body.find(ERROR_EVENT_MARKER) if body else -1
    if at >= 0:
        record.note_error(*error_frame_details(body, at))


def outcome_of(record: RequestRecord, scope: Scope, error: BaseException | None, ended_at: float) -> RequestOutcome:
    """How the request ended: the exception first, then what the response itself reported."""
    status, code, message = record.status, record.error_code, record.error_message
    if isinstance(error, LmgateError):
        code, message = error.code, error.message
        status = status or error.status  # what ErrorMiddleware renders when nothing was sent
    elif isinstance(error, anyio.get_cancelled_exc_class()):
        code, message, status = "client_cancelled", "The request was cancelled.", status or 499
    elif error is not None:
        code, message, status = "internal_error", f"{type(error).__name__}: {error}", status or 500
    elif not status:
        code, message, status = "internal_error", "The request ended without a response.", 500
    category = events.categorise(code, status) if code is not None or status >= 400 else None
    if category is not None and message is None:
        message = f"HTTP {status}" + (f" {code}" if code else "")
    latency_s = ended_at - record.started_at
    first = record.first_byte_at if record.event_stream else None  # a time to first *token*: streams only
    ttft_s = first - record.started_at if first is not None else None
    tokens_in, tokens_out = record.tokens("prompt_tokens"), record.tokens("completion_tokens")
    tokens_per_s = time_per_token_s = None
    if tokens_out and category is None:
        if first is not None and tokens_out > 1 and ended_at > first:
            time_per_token_s = (ended_at - first) / (tokens_out - 1)
            tokens_per_s = 1 / time_per_token_s
        elif latency_s > 0:
            tokens_per_s = tokens_out / latency_s
    return RequestOutcome(
        latency_s=latency_s,
        status=status,
        category=category,
        code=code if category is not None else None,
        message=message if category is not None else None,
        attempts=attempt_number(scope),
        ttft_s=ttft_s,
        queue_wait_s=record.admitted_at - record.started_at if record.admitted_at is not None else None,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        tokens_per_s=tokens_per_s,
        time_per_token_s=time_per_token_s,
    )
