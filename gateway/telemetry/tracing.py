"""OpenTelemetry traces: one server span per request, one client span per upstream attempt.

* The server span covers the whole request, every retry included, and ends when the last byte
  went out or the request failed or was cancelled; nothing is recorded per SSE chunk (the ASGI
  instrumentation's ``http send``/``receive`` spans would add one per chunk, see
  ``docs/observability.md``). Its name and attributes follow the GenAI semantic conventions
  (``chat qwen3-8b``; ``gen_ai.request.model``, ``gen_ai.usage.*``,
  ``gen_ai.response.time_to_first_chunk``...).
* Each attempt at the upstream is a child span from opentelemetry-instrumentation-httpx, which
  also writes the W3C ``traceparent`` of that attempt on the upstream request. A client's own
  ``traceparent`` makes the server span its child; with tracing off it is forwarded unchanged.
* lmgate's log events raised during a request (``retry``, ``circuit_state``, ``timeout``...)
  become events on its span (:class:`SpanEventHandler`), so a trace tells the same story as the logs.

The provider is built from config (and the standard ``OTEL_*`` variables the SDK reads itself),
or injected (tests pass one with an in-memory exporter). With tracing off none of this module
runs on the request path: no tracer, no span objects, an uninstrumented client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextvars import Token
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway import __version__
from gateway.config.settings import TracingConfig
from gateway.telemetry.logs import record_fields
from gateway.telemetry.record import NOT_INFERENCE, RequestOutcome, RequestRecord
from middleware.types import Scope

# LM Studio has no registered gen_ai.provider.name value; custom values are allowed.
PROVIDER = "lm_studio"
_REQUEST_PARAMETERS = {
    "max_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
}


def build_tracer_provider(config: TracingConfig, *, resource: Mapping[str, str] | None = None) -> TracerProvider:
    """A provider exporting in batches to OTLP/HTTP or the console.

    Unset keys defer to the SDK's variables: ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` and
    ``_HEADERS``, ``OTEL_TRACES_SAMPLER(_ARG)``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_BSP_*``.
    """
    attributes = dict(resource or {})
    if config.service_name:
        attributes["service.name"] = config.service_name
    merged = Resource.create(attributes)
    if str(merged.attributes.get("service.name", "")).startswith("unknown_service"):
        merged = merged.merge(Resource({"service.name": "lmgate"}))
    sampler = ParentBased(TraceIdRatioBased(config.sample_ratio)) if config.sample_ratio is not None else None
    provider = TracerProvider(resource=merged, sampler=sampler)
    exporter: SpanExporter
    if config.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """Starts and ends the server span of each request; instruments the upstream client."""

    def __init__(
        self,
        provider: TracerProvider,
        *,
        upstream_url: str,
        upstream_urls: Mapping[str, str] | None = None,
        owned: bool = False,
    ) -> None:
        self.provider = provider
        self.owned = owned
        self.tracer = provider.get_tracer("lmgate", __version__)
        self.server_address, self.server_port = _address(upstream_url)
        #: Each upstream's address by name: a request's span ends naming the one that served it.
        self.addresses = {name: _address(url) for name, url in (upstream_urls or {}).items()}
        fields = propagate.get_global_textmap().fields
        self._carrier_headers = frozenset(field.lower().encode("latin-1") for field in fields)

    def instrument(self, client: httpx.AsyncClient) -> None:
        """Give every upstream attempt a client span and a ``traceparent`` header."""
        # Imported here: the instrumentation (and wrapt, packaging) is ~3 MB resident, needed only
        # when tracing is on.
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def start(
        self, scope: Scope, record: RequestRecord, *, start_ns: int, request_id: str, body: dict[str, Any] | None
    ) -> Token[Context]:
        """Start the request's span as a child of the client's ``traceparent`` and make it current.

        Returns the token that :meth:`finish` needs to restore the previous context.
        """
        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope.get("headers", ())
            if key in self._carrier_headers
        }
        parent = propagate.extract(carrier) if carrier else None
        inference = record.operation != NOT_INFERENCE
        if inference and record.model:
            name = f"{record.operation} {record.model}"
        else:
            name = f"{scope['method']} {record.route}"
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=start_ns)
        record.span = span
        if span.is_recording():
            attributes: dict[str, Any] = {
                "http.request.method": scope["method"],
                "url.path": scope.get("path", ""),
                "http.route": record.route,
                "server.address": self.server_address,
                "server.port": self.server_port,
                "lmgate.request_id": request_id,
            }
            if inference:
                attributes["gen_ai.operation.name"] = record.operation
                attributes["gen_ai.provider.name"] = PROVIDER
                attributes["gen_ai.request.stream"] = record.stream
                if record.model:
                    attributes["gen_ai.request.model"] = record.model
                for key, attribute in _REQUEST_PARAMETERS.items():
                    value = (body or {}).get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        attributes[attribute] = value
            span.set_attributes(attributes)
        return otel_context.attach(trace.set_span_in_context(span, parent))

    def finish(self, record: RequestRecord, outcome: RequestOutcome | None, token: Token[Context]) -> None:
        """Close the span with how the request ended (None: unknown), and restore the previous context."""
        span = record.span
        otel_context.detach(token)
        if outcome is not None and span.is_recording():
            attributes: dict[str, Any] = {
                "http.response.status_code": outcome.status,
                "lmgate.attempts": outcome.attempts,
            }
            if record.upstream is not None:
                attributes["lmgate.upstream"] = record.upstream
                if record.upstream in self.addresses:
                    attributes["server.address"], attributes["server.port"] = self.addresses[record.upstream]
            optional = {
                "gen_ai.usage.input_tokens": outcome.tokens_in,
                "gen_ai.usage.output_tokens": outcome.tokens_out,
                "lmgate.usage.input_source": record.usage_source("input") if outcome.tokens_in is not None else None,
                "lmgate.usage.output_source": record.usage_source("output") if outcome.tokens_out is not None else None,
                "gen_ai.response.time_to_first_chunk": outcome.ttft_s,
                "gen_ai.response.model": record.response_model,
                "gen_ai.response.id": record.response_id,
                "lmgate.model_state": record.model_state,
                "lmgate.model_load_wait_s": record.model_load_s,
            }
            attributes.update((key, value) for key, value in optional.items() if value is not None)
            if outcome.code == "circuit_open":
                span.add_event("lmgate.circuit_open", {"message": outcome.message or ""})  # the breaker shed it
            if outcome.category is not None:
                attributes["error.type"] = outcome.category
                attributes["lmgate.error_code"] = outcome.code or ""
                span.set_status(Status(StatusCode.ERROR, outcome.message))
            span.set_attributes(attributes)
        span.end()

    async def aclose(self) -> None:
        """Flush and stop the exporter when this object built the provider (not an injected one)."""
        if self.owned:
            await anyio.to_thread.run_sync(self.provider.shutdown)


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def add_event(record: RequestRecord | None, name: str, attributes: Mapping[str, Any]) -> None:
    """An event on the request's span, when it has a recording one."""
    span = record.span if record is not None else None
    if span is not None and span.is_recording():
        span.add_event(name, dict(attributes))


def start_ns() -> int:
    return time.time_ns()


class SpanEventHandler(logging.Handler):
    """Copies lmgate's log events made while a span is current onto that span as span events.

    Stateless: it asks OpenTelemetry for the current span, so one instance serves any number of
    gateways. The telemetry logger's own request events are skipped: they are the span itself.
    """

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if not event or record.name == "lmgate.telemetry":
            return
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attributes: dict[str, Any] = {"message": record.getMessage()}
        for key, value in record_fields(record).items():
            if key != "event" and isinstance(value, (str, bool, int, float)):
                attributes[f"lmgate.{key}"] = value
        span.add_event(event, attributes)


def install_span_events(logger: logging.Logger | None = None) -> None:
    """Add a :class:`SpanEventHandler` to the ``lmgate`` logger once (idempotent)."""
    logger = logger or logging.getLogger("lmgate")
    if not any(isinstance(handler, SpanEventHandler) for handler in logger.handlers):
        logger.addHandler(SpanEventHandler())
