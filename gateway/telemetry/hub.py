"""``Telemetry``: one gateway's logs, metrics, traces and health checks, built from its config.

One instance per ``Gateway`` (no module-level state): its own Prometheus registry, its own tracer
provider (built from config, or injected), its own latency windows and probes. Its two layers,
``TelemetryMiddleware`` (outside the forwarded stack) and ``AdmissionMark`` (right inside the
concurrency layer), are in ``gateway.telemetry.middleware`` and are listed with every other layer
in ``gateway.stack.build_stack``; the admin routes read ``metrics.render`` and ``llm_health.report``.

Layers that know things the telemetry layer cannot see report them here: a circuit changing
state (:meth:`circuit_changed`), a model load (:meth:`model_load`, for the cold-start handling;
it also marks the request ``model_state: cold``). Each upstream's layers report through callbacks
bound to its name (:meth:`circuit_observer`, :meth:`load_observer`), and a finished request is
labelled with the upstream that served it (``upstream_of``: the router's choice, injected).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import Token
from typing import Any

import httpx
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider

from gateway import __version__
from gateway.config.settings import Config
from gateway.models.coldstart import model_state as coldstart_model_state
from gateway.models.service import LoadObserver
from gateway.telemetry import events
from gateway.telemetry.health import LatencyWindows, LlmHealth
from gateway.telemetry.metrics import GatewayMetrics, RoutingStats, StateCollector, WatchedUpstream
from gateway.telemetry.middleware import outcome_of
from gateway.telemetry.record import NOT_INFERENCE, RequestOutcome, RequestRecord, record_of
from gateway.telemetry.tracing import Tracing, add_event, build_tracer_provider, install_span_events
from middleware.body import DEFAULT_LIMIT_BYTES
from middleware.drain import DrainState
from middleware.request_id import request_id
from middleware.types import Clock, Scope

logger = logging.getLogger("lmgate.telemetry")

RequestObserver = Callable[[RequestRecord, RequestOutcome], None]
#: The name of the upstream a request was sent to (None: it was sent nowhere, or there is no router).
UpstreamOf = Callable[[Scope], str | None]


class Telemetry:
    """See the module docstring. Build it with :meth:`from_config`; the constructor is for tests."""

    def __init__(
        self,
        *,
        metrics: GatewayMetrics | None,
        tracing: Tracing | None,
        windows: LatencyWindows,
        llm_health: LlmHealth,
        log_prompts: bool = False,
        request_stream_usage: bool = True,
        first_token_s: Callable[[str | None], float] = lambda model: 45.0,
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        clock: Clock = time.monotonic,
        upstreams: Sequence[str] = ("default",),
        upstream_of: UpstreamOf | None = None,
    ) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.windows = windows
        self.llm_health = llm_health
        self.log_prompts = log_prompts
        self.request_stream_usage = request_stream_usage
        self.first_token_s = first_token_s
        self.body_limit_bytes = body_limit_bytes
        self.clock = clock
        self.upstream_of = upstream_of
        #: With one upstream every request is its; with several, the one the router chose (or none).
        self.sole_upstream = upstreams[0] if len(upstreams) == 1 else None
        #: Readiness waits for this; the cold-start preload sets it False, then True when done.
        self.preloaded = True
        #: Whether some layer reports model loads; until one does, ``model_state`` is "unknown".
        self.loads_observed = False
        #: Called with each finished request's record and outcome (status pages, tests).
        self.on_request_end: list[RequestObserver] = []

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        client: httpx.AsyncClient,
        api_key: str | None = None,
        tracer_provider: TracerProvider | None = None,
        clock: Clock = time.monotonic,
        upstream_of: UpstreamOf | None = None,
    ) -> Telemetry:
        """Telemetry for a gateway forwarding with ``client`` (the first upstream's).

        Tracing is on when ``config.tracing.enabled`` or a ``tracer_provider`` is given; then
        ``client`` is instrumented, so each upstream attempt becomes a child span (other upstreams'
        clients: :meth:`instrument`). ``upstream_of`` names the upstream a request went to.
        """
        digest = config.digest()
        pipeline = config.logging.pipeline_version or ""
        metrics = None
        if config.metrics.enabled:
            metrics = GatewayMetrics(
                duration_buckets_s=config.metrics.duration_buckets_s,
                max_models=config.metrics.max_models,
                models=config.health.models,
                info={"version": __version__, "config_hash": digest, "pipeline_version": pipeline},
            )
        tracing = None
        upstreams = config.upstream_list()
        upstream = upstreams[0].url
        urls = {u.name: u.url for u in upstreams}
        if tracer_provider is not None:
            tracing = Tracing(tracer_provider, upstream_url=upstream, upstream_urls=urls)
        elif config.tracing.enabled:
            resource = {"service.version": __version__, "lmgate.config_hash": digest}
            if pipeline:
                resource["lmgate.pipeline_version"] = pipeline
            provider = build_tracer_provider(config.tracing, resource=resource)
            tracing = Tracing(provider, upstream_url=upstream, upstream_urls=urls, owned=True)
        if tracing is not None:
            tracing.instrument(client)
            install_span_events()
        health = config.health
        windows = LatencyWindows(window_s=health.latency_window_s, max_models=config.metrics.max_models, clock=clock)
        timeouts = config.timeouts

        def first_token_s(model: str | None) -> float:
            override = timeouts.per_model.get(model) if model is not None else None
            return (override.first_token_s if override is not None else None) or timeouts.first_token_s

        return cls(
            metrics=metrics,
            tracing=tracing,
            windows=windows,
            llm_health=LlmHealth(client, upstream, name=upstreams[0].name, api_key=api_key, models=health.models,
                                 ttl_s=health.llm_check_ttl_s,
                                 timeout_s=health.llm_check_timeout_s, windows=windows, clock=clock),
            log_prompts=config.logging.prompts,
            request_stream_usage=config.metrics.request_stream_usage,
            first_token_s=first_token_s,
            body_limit_bytes=config.limits.body_bytes,
            clock=clock,
            upstreams=tuple(urls),
            upstream_of=upstream_of,
        )

    def instrument(self, client: httpx.AsyncClient) -> None:
        """Trace ``client``'s requests too (another upstream's client), when tracing is on."""
        if self.tracing is not None:
            self.tracing.instrument(client)

    def watch(
        self, *, drain: DrainState, upstreams: Mapping[str, WatchedUpstream], routing: RoutingStats | None = None
    ) -> None:
        """Expose the layers' own state as metrics at scrape time: each upstream's retries, circuits
        and slots (by its name), the router's decisions (several upstreams), the drain."""
        if self.metrics is not None:
            collector = StateCollector(upstreams=upstreams, drain=drain, routing=routing)
            self.metrics.registry.register(collector)

    def circuit_changed(self, circuit: str, old: str, new: str, *, upstream: str | None = None) -> None:
        """The breaker's ``on_state_change``: counts transitions (the breaker logs them itself)."""
        if self.metrics is not None:
            self.metrics.circuit_transitions.labels(circuit, new, upstream or self.sole_upstream or "").inc()

    def circuit_observer(self, upstream: str) -> Callable[[str, str, str], None]:
        """:meth:`circuit_changed` for the breaker of ``upstream``."""

        def changed(circuit: str, old: str, new: str) -> None:
            self.circuit_changed(circuit, old, new, upstream=upstream)

        return changed

    def load_observer(self, upstream: str) -> LoadObserver:
        """:meth:`model_load` for the model service of ``upstream`` (its ``on_load``)."""

        def loaded(model: str, load_s: float, *, ok: bool, error: str | None) -> None:
            self.model_load(model, load_s, ok=ok, error=error, upstream=upstream)

        return loaded

    def model_load(
        self,
        model: str,
        load_s: float,
        *,
        ok: bool = True,
        error: str | None = None,
        scope: Scope | None = None,
        upstream: str | None = None,
    ) -> None:
        """Report a model load on ``upstream`` that took ``load_s``; with ``scope``, the request that
        waited for it."""
        upstream = upstream or self.sole_upstream
        record = record_of(scope) if scope is not None else None
        rid = request_id(scope) if scope is not None else None
        if record is not None:
            record.model_load_s = load_s
            attributes = {"gen_ai.request.model": model, "lmgate.load_s": load_s, "lmgate.ok": ok}
            add_event(record, "lmgate.model_load", attributes)
        if self.metrics is not None:
            outcome = "ok" if ok else "failed"
            self.metrics.model_loads.labels(self.metrics.model_label(model), outcome, upstream or "").observe(load_s)
        events.log_model_load(model, load_s, ok=ok, request_id=rid, error=error, upstream=upstream)

    def upstream(self, scope: Scope) -> str | None:
        """The upstream that served the request: the router's choice, or the only upstream."""
        chosen = self.upstream_of(scope) if self.upstream_of is not None else None
        return chosen or self.sole_upstream

    def finish(
        self, scope: Scope, record: RequestRecord, error: BaseException | None, begun: tuple[str, Token[Context] | None] | None
    ) -> None:
        """Turn a finished request into metrics, a log line and the span's end. Never raises:
        a telemetry fault must not change what the client gets."""
        model_label, token = begun if begun is not None else ("", None)
        outcome: RequestOutcome | None = None
        try:
            record.upstream = self.upstream(scope)
            if record.model_state is None or record.model_load_s is None:
                # The heartbeat layer may have started the stream before the cold-start layer's
                # headers existed (or with the state only, the load time unknown then); the
                # cold-start layer left the same facts in the scope.
                reported = coldstart_model_state(scope)
                if reported is not None:
                    record.model_state, record.model_load_s = reported
            outcome = outcome_of(record, scope, error, self.clock())
            if self.metrics is not None:
                if begun is not None:
                    self.metrics.in_flight.labels(model_label).dec()
                self.metrics.observe(record, outcome)
            if outcome.category is None and record.model and record.operation != NOT_INFERENCE:
                self.windows.add(record.model, outcome.latency_s, outcome.ttft_s)
            self._log(scope, record, outcome)
            for observer in self.on_request_end:
                observer(record, outcome)
        except Exception:
            logger.exception("telemetry failed for a request", extra={"event": "telemetry_error"})
        finally:
            if token is not None and self.tracing is not None:
                self.tracing.finish(record, outcome, token)

    def _log(self, scope: Scope, record: RequestRecord, outcome: RequestOutcome) -> None:
        inference = record.operation != NOT_INFERENCE
        if outcome.category is None and not inference:
            return
        fields: dict[str, Any] = {
            "request_id": request_id(scope),
            "route": record.route,
            "model": record.model,
            "stream": record.stream,
            "status": outcome.status,
            "latency_ms": round(outcome.latency_s * 1000),
        }
        if record.upstream is not None:
            fields["upstream"] = record.upstream
        if outcome.ttft_s is not None:
            fields["ttft_ms"] = round(outcome.ttft_s * 1000)
        if outcome.queue_wait_s is not None:
            fields["queue_ms"] = round(outcome.queue_wait_s * 1000)
        if outcome.category is not None:
            fields.update(attempt=outcome.attempts, error_category=outcome.category, error_code=outcome.code)
            if record.model_state is not None:
                fields["model_state"] = record.model_state
            events.log_error(outcome.message or outcome.category, fields)
            return
        fields.update(
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
            tokens_per_s=round(outcome.tokens_per_s, 1) if outcome.tokens_per_s is not None else None,
            attempts=outcome.attempts,
            model_state=self._model_state(record),
        )
        if outcome.tokens_in is not None:
            fields["tokens_in_source"] = record.usage_source("input")
        if outcome.tokens_out is not None:
            fields["tokens_out_source"] = record.usage_source("output")
        if record.model_load_s is not None:
            fields["load_ms"] = round(record.model_load_s * 1000)
        events.log_success(fields)

    def _model_state(self, record: RequestRecord) -> str:
        if record.model_state is not None:
            return record.model_state
        if record.model_load_s is not None:
            return "cold"
        return "warm" if self.loads_observed else "unknown"

    async def aclose(self) -> None:
        """Flush traces (when the provider was built here)."""
        if self.tracing is not None:
            await self.tracing.aclose()
