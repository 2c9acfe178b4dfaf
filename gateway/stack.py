"""The gateway's request path, declared in one place: :func:`build_stack`.

Two steps, each a plain function:

* :func:`build_collaborators` builds the shared objects once (the upstream client, the drain
  state, telemetry, the model service, the proxy, the status page's request board) and wires them
  to each other;
* :func:`build_stack` stacks the layers around the proxy, one line per layer, outermost first
  (read it like Envoy's filter list), and returns a :class:`Stack`: the ASGI app, which also
  names the layers it was built from.

docs/architecture.md lists the layers with what each does; docs/errors.md says how failures are
shaped. lmgate's own routes branch off above telemetry: a health check must answer while the
upstream queue is full or the circuit is open, so they skip the resilience layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from opentelemetry.sdk.trace import TracerProvider

from gateway.admin.openapi import openapi_document
from gateway.admin.routes import AdminRoutes, is_admin_path, requires_admin_key
from gateway.admin.status import RequestBoard, StatusPage
from gateway.admin.view import DrainFacts, GatewayView, ReadinessFacts
from gateway.config.settings import Config
from gateway.models import ModelService
from gateway.models.admin import serve_models
from gateway.models.coldstart import ColdStartMiddleware, early_headers, heartbeat_describer
from gateway.proxy.aiohttp_transport import AiohttpTransport
from gateway.proxy.relay import Proxy
from gateway.proxy.transport import FramingGuard
from gateway.request.routes import RequestNormalisation, RouteTable, route_path
from gateway.request.validation import RequestValidation
from gateway.telemetry import AdmissionMark, Telemetry, TelemetryMiddleware
from middleware.auth import AuthMiddleware, client_identity, loopback_client
from middleware.body import BodyDeadlines
from middleware.cache import CacheMiddleware, MemoryStore
from middleware.circuit_breaker import CircuitBreakerMiddleware
from middleware.concurrency import ConcurrencyMiddleware
from middleware.drain import DrainMiddleware, DrainState
from middleware.embeddings import Base64EmbeddingsMiddleware
from middleware.errors import ErrorMiddleware
from middleware.heartbeat import HeartbeatMiddleware
from middleware.retry import RetryMiddleware
from middleware.timeout import TimeoutMiddleware
from middleware.types import ASGIApp, Receive, Scope, Send

__all__ = ["Collaborators", "GatewaySnapshot", "Layer", "Stack", "build_collaborators", "build_stack", "make_upstream_client"]

_T = TypeVar("_T")


# -- the shared objects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Collaborators:
    """The objects several layers (and lmgate's own routes) share, built once per gateway."""

    client: httpx.AsyncClient  # the one pooled client for the upstream
    drain: DrainState
    telemetry: Telemetry
    models: ModelService
    proxy: Proxy
    board: RequestBoard  # the status page's memory of recent requests


def make_upstream_client(config: Config) -> httpx.AsyncClient:
    """The one pooled client for the upstream, with explicit timeouts.

    httpx's default 5 s read timeout would cut every model load; the read timeout here is only a
    backstop at the total deadline, while the timeout middleware enforces the real deadlines.
    ``trust_env=False``: an HTTP_PROXY variable must never reroute traffic meant for localhost.

    One limit governs: the pool is sized from the concurrency limit (``Config.upstream_pool_connections``),
    so requests wait in lmgate's queue, where they are bounded, counted and told when to retry, not
    in the pool. A wait for a connection that remains (an explicit pool with per-model limits or
    without a limit) lasts at most ``concurrency.max_wait_s``, like a wait in the queue, and is
    refused like one (``translate_transport_error``: 503 ``overloaded``).

    The transport (``upstream.transport``) is lmgate's :class:`AiohttpTransport` (httpx's API over
    aiohttp's I/O, gateway/proxy/aiohttp_transport.py), or httpx's own behind a
    :class:`FramingGuard`. Either way a connection the upstream sent more on than its response
    declared is closed, never handed to another client's request.
    """
    timeouts = config.timeouts
    pool = config.upstream.pool
    limits = httpx.Limits(
        max_connections=config.upstream_pool_connections(),
        max_keepalive_connections=pool.max_keepalive_connections,
        keepalive_expiry=pool.keepalive_expiry_s,
    )
    transport: httpx.AsyncBaseTransport
    if config.upstream.transport == "aiohttp":
        transport = AiohttpTransport(limits)
    else:
        transport = FramingGuard(httpx.AsyncHTTPTransport(limits=limits, trust_env=False))
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=timeouts.connect_s,
            read=timeouts.total_s,
            write=timeouts.total_s,
            pool=config.concurrency.max_wait_s,
        ),
        transport=transport,
        follow_redirects=False,
        trust_env=False,
    )


def build_collaborators(
    config: Config,
    *,
    env: Mapping[str, str] | None = None,
    drain: DrainState | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Collaborators:
    """The shared objects for ``config``, wired to each other (not yet to any layer)."""
    api_key = config.upstream.resolved_api_key(os.environ if env is None else env)
    client = make_upstream_client(config)
    telemetry = Telemetry.from_config(config, client=client, api_key=api_key, tracer_provider=tracer_provider)
    limits = config.limits
    proxy = Proxy(
        client=client,
        upstream_url=config.upstream.url,
        routes=RouteTable(extra_prefixes=config.routes.extra_prefixes),
        api_key=api_key,
        forward_client_auth=config.upstream.forward_client_auth,
        assemble_non_streaming=config.routes.assemble_non_streaming,
        normalise_errors=config.routes.normalise_errors,
        body_limit_bytes=limits.body_bytes,
        assembled_limit_bytes=limits.assembled_bytes,
        frame_limit_bytes=limits.frame_bytes,
    )
    models = ModelService.from_config(config, client=client, api_key=api_key, on_load=telemetry.model_load)
    proxy.model_info = models.model_info  # /api/v0 answers lmgate assembles
    board = RequestBoard()
    telemetry.on_request_end.append(board.observe)
    return Collaborators(client=client, drain=drain or DrainState(), telemetry=telemetry, models=models, proxy=proxy, board=board)


# -- the stack ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One named layer of the stack: ``wrap(inner)`` returns the layer around ``inner``."""

    name: str
    wrap: Callable[[ASGIApp], ASGIApp]


class Stack:
    """The composed request path: an ASGI app that names the layers it was built from.

    :meth:`build` stacks its layers, listed outermost first, around the terminal app; :attr:`layers`
    then holds each built layer by name (the stateful ones are also properties).
    """

    def __init__(self) -> None:
        self.layers: dict[str, ASGIApp] = {}
        self._app: ASGIApp | None = None

    def build(self, *layers: Layer | None, app: ASGIApp) -> Stack:
        """Stack ``layers`` (outermost first; None: off in this config) around the terminal ``app``."""
        for layer in reversed([layer for layer in layers if layer is not None]):
            app = self.layers[layer.name] = layer.wrap(app)
        self._app = app
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._app is not None, "Stack.build was not called"
        await self._app(scope, receive, send)

    def layer(self, name: str, kind: type[_T]) -> _T | None:
        """The layer called ``name`` if the stack has it (it must be a ``kind``)."""
        layer = self.layers.get(name)
        if layer is None:
            return None
        if not isinstance(layer, kind):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not a {kind.__name__}")
        return layer

    @property
    def breaker(self) -> CircuitBreakerMiddleware | None:
        return self.layer("circuit_breaker", CircuitBreakerMiddleware)

    @property
    def retry(self) -> RetryMiddleware | None:
        return self.layer("retry", RetryMiddleware)

    @property
    def concurrency(self) -> ConcurrencyMiddleware | None:
        return self.layer("concurrency", ConcurrencyMiddleware)

    @property
    def cache(self) -> CacheMiddleware | None:
        return self.layer("cache", CacheMiddleware)


def build_stack(config: Config, *, collaborators: Collaborators) -> Stack:
    """Every layer of the request path, outermost first (docs/architecture.md says what each does)."""
    c, stack = collaborators, Stack()
    stack.build(
        _errors(),  # ErrorMiddleware: every LmgateError as OpenAI-shaped JSON; unknown errors -> logged 500
        _request_normalisation(c),  # RequestNormalisation: the canonical path (400 if none), no credentials in the query
        _auth(config),  # AuthMiddleware: client keys (401), admin keys (403); off without keys
        _body_deadlines(config),  # BodyDeadlines: 408 for a request body that stalls
        _own_routes(config, c, GatewaySnapshot(config, c, stack)),  # OwnRoutes -> AdminRoutes: /healthz, /lmgate/...
        _telemetry(c),  # TelemetryMiddleware: logs, metrics and the span of each forwarded request, once
        _request_validation(config, c),  # RequestValidation: 4xx for what the upstream cannot serve
        _per_key_concurrency(config),  # ConcurrencyMiddleware per client key (auth.per_key_limit): 429
        _drain(config, c),  # DrainMiddleware: 503 draining once shutdown began
        _cache(config, c),  # CacheMiddleware: repeated deterministic requests answered from memory
        _base64_embeddings(config),  # Base64EmbeddingsMiddleware: float embeddings encoded for base64 clients
        _heartbeat(config, c),  # HeartbeatMiddleware: SSE comments in silences; starts a slow stream early
        _cold_start(config, c),  # ColdStartMiddleware: loads a cold model first (single flight)
        _concurrency(config),  # ConcurrencyMiddleware: the limit and a bounded FIFO queue
        _admission_mark(c),  # AdmissionMark: notes the queue wait for telemetry
        _timeout(config),  # TimeoutMiddleware: first token / idle / total (retries included)
        _retry(config),  # RetryMiddleware: only before the first byte reaches the client
        _circuit_breaker(config, c),  # CircuitBreakerMiddleware: per attempt
        app=c.proxy,  # Proxy: httpx stream to the upstream, one chunk in, one chunk out
    )
    _watch(stack, c)
    return stack


def _watch(stack: Stack, c: Collaborators) -> None:
    """Expose the stateful layers to telemetry at scrape time (cache size, retries, circuits, slots)."""
    metrics = c.telemetry.metrics
    cache = stack.cache
    if cache is not None and metrics is not None:
        metrics.watch_cache(cache.store)
    c.telemetry.watch(drain=c.drain, retry=stack.retry, breaker=stack.breaker, concurrency=stack.concurrency)


# -- the layers, in stack order ----------------------------------------------------------------


def _errors() -> Layer:
    return Layer("errors", ErrorMiddleware)


def _request_normalisation(c: Collaborators) -> Layer:
    # Outside auth: the request target is rewritten to its canonical form once, before any
    # decision reads it (gateway/request/paths.py); the proxy forwards that same form.
    return Layer("request_normalisation", lambda app: RequestNormalisation(app, routes=c.proxy.routes))


def _auth(config: Config) -> Layer:
    # Outside telemetry: a client without a key cannot make lmgate read, log or time its body.
    auth = config.auth
    return Layer(
        "auth",
        lambda app: AuthMiddleware(
            app,
            key_digests=auth.digests(),
            admin_digests=auth.admin_keys,
            open_paths=auth.open_paths,
            open_from=loopback_client if auth.open_from == "loopback" else lambda scope: True,
            requires_admin=requires_admin_key,
            path_of=route_path,
        ),
    )


def _body_deadlines(config: Config) -> Layer:
    # Whichever layer reads a body first (telemetry, admin, proxy), it cannot wait for ever.
    limits = config.limits
    return Layer("body_deadlines", lambda app: BodyDeadlines(app, idle_s=limits.body_idle_s, total_s=limits.body_total_s))


class OwnRoutes:
    """lmgate's own routes branch off here; every other request continues down the stack."""

    def __init__(self, app: ASGIApp, *, routes: ASGIApp) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_admin_path(route_path(scope)):
            await self.routes(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _own_routes(config: Config, c: Collaborators, view: GatewayView) -> Layer:
    models = c.models

    async def serve_model_routes(scope: Scope, receive: Receive, send: Send) -> None:
        await serve_models(models, scope, send)

    admin = AdminRoutes(
        view,
        openapi=openapi_document(config),
        models=serve_model_routes,
        pages=StatusPage(view, board=c.board),  # GET /lmgate/ and /lmgate/status.json
    )
    return Layer("own_routes", lambda app: OwnRoutes(app, routes=admin))


def _telemetry(c: Collaborators) -> Layer:
    return Layer("telemetry", lambda app: TelemetryMiddleware(app, telemetry=c.telemetry))


def _request_validation(config: Config, c: Collaborators) -> Layer:
    limits = config.limits
    return Layer(
        "request_validation",
        lambda app: RequestValidation(
            app,
            routes=c.proxy.routes,
            body_limit_bytes=limits.body_bytes,
            header_limit_bytes=limits.header_bytes,
            url_limit_bytes=limits.url_bytes,
        ),
    )


def _per_key_concurrency(config: Config) -> Layer | None:
    # 429 for one key over its share, before the shared queue.
    auth = config.auth
    if auth.per_key_limit is None:
        return None
    limit = auth.per_key_limit
    return Layer(
        "per_key_concurrency",
        lambda app: ConcurrencyMiddleware(
            app,
            limit=limit,
            max_queue=auth.per_key_queue,
            max_wait_s=config.concurrency.max_wait_s,
            client_key=client_identity,
        ),
    )


def _drain(config: Config, c: Collaborators) -> Layer:
    return Layer("drain", lambda app: DrainMiddleware(app, state=c.drain, retry_after_s=config.drain.retry_after_s))


def _cache(config: Config, c: Collaborators) -> Layer | None:
    # Outside the model layers: a hit neither loads a model nor takes a slot.
    cache, metrics = config.cache, c.telemetry.metrics
    if not cache.enabled:
        return None
    return Layer(
        "cache",
        lambda app: CacheMiddleware(
            app,
            store=MemoryStore(max_entries=cache.max_entries, max_bytes=cache.max_bytes),
            ttl_s=cache.ttl_s,
            max_entry_bytes=cache.max_entry_bytes,
            on_result=metrics.cache_result if metrics is not None else None,
            path_of=route_path,
            body_limit_bytes=config.limits.body_bytes,
        ),
    )


def _base64_embeddings(config: Config) -> Layer:
    return Layer(
        "base64_embeddings",
        lambda app: Base64EmbeddingsMiddleware(app, body_limit_bytes=config.limits.body_bytes, path_of=route_path),
    )


def _heartbeat(config: Config, c: Collaborators) -> Layer | None:
    # Outside concurrency and the timeout: heartbeats cover the queue and the load, and the
    # first-token clock starts once the model is loaded (docs/cold-starts.md).
    options = config.models
    if options.heartbeat_s is None:
        return None
    interval_s = options.heartbeat_s
    return Layer(
        "heartbeat",
        lambda app: HeartbeatMiddleware(
            app,
            interval_s=interval_s,
            describe=heartbeat_describer(c.models.registry, status_events=options.status_events),
            # With cold starts on, a stream started early carries the model state headers.
            start_headers=early_headers if options.enabled else None,
            body_limit_bytes=config.limits.body_bytes,
        ),
    )


def _cold_start(config: Config, c: Collaborators) -> Layer | None:
    options = config.models
    if not options.enabled:
        return None
    return Layer(
        "cold_start",
        lambda app: ColdStartMiddleware(
            app,
            registry=c.models.registry,
            loader=c.models.loader,
            on_loading=options.on_loading,
            body_limit_bytes=config.limits.body_bytes,
        ),
    )


def _concurrency(config: Config) -> Layer | None:
    c = config.concurrency
    if not c.enabled:
        return None
    return Layer(
        "concurrency",
        lambda app: ConcurrencyMiddleware(
            app,
            limit=c.limit,
            max_queue=c.max_queue,
            max_wait_s=c.max_wait_s,
            per_model=c.per_model,
            adaptive=c.adaptive,
            min_limit=min(c.min_limit, c.limit),
            max_limit=max(c.max_limit, c.limit),
            latency_threshold_s=c.latency_threshold_s,
        ),
    )


def _admission_mark(c: Collaborators) -> Layer:
    return Layer("admission_mark", lambda app: AdmissionMark(app, telemetry=c.telemetry))


def _timeout(config: Config) -> Layer:
    t = config.timeouts
    per_model = {model: overrides.model_dump(exclude_none=True) for model, overrides in t.per_model.items()}
    return Layer(
        "timeout",
        lambda app: TimeoutMiddleware(
            app,
            first_token_s=t.first_token_s,
            idle_s=t.idle_s,
            total_s=t.total_s,
            per_model=per_model,
            body_limit_bytes=config.limits.body_bytes,
        ),
    )


def _retry(config: Config) -> Layer | None:
    r = config.retry
    if not (r.enabled and r.max_retries > 0):
        return None
    return Layer(
        "retry",
        lambda app: RetryMiddleware(
            app,
            max_retries=r.max_retries,
            backoff_base_s=r.backoff_base_s,
            backoff_max_s=r.backoff_max_s,
            jitter=r.jitter,
            retry_statuses=r.retry_statuses,
            max_retry_after_s=r.max_retry_after_s,
            body_limit_bytes=min(r.body_limit_bytes, config.limits.body_bytes),
            budget_ratio=r.budget_ratio,
            budget_min_retries=r.budget_min_retries,
        ),
    )


def _circuit_breaker(config: Config, c: Collaborators) -> Layer | None:
    cb = config.circuit_breaker
    if not cb.enabled:
        return None
    return Layer(
        "circuit_breaker",
        lambda app: CircuitBreakerMiddleware(
            app,
            failure_threshold=cb.failure_threshold,
            failure_ratio=cb.failure_ratio,
            window_s=cb.window_s,
            min_requests=cb.min_requests,
            reset_timeout_s=cb.reset_timeout_s,
            half_open_max_probes=cb.half_open_max_probes,
            per_model=cb.per_model,
            body_limit_bytes=config.limits.body_bytes,
            on_state_change=c.telemetry.circuit_changed,
        ),
    )


# -- what lmgate's own routes read ---------------------------------------------------------------


class GatewaySnapshot:
    """The :class:`~gateway.admin.view.GatewayView` of one gateway: plain data from its parts.

    It reads the stack's stateful layers when asked (they exist once the stack is built).
    """

    def __init__(self, config: Config, collaborators: Collaborators, stack: Stack) -> None:
        self.config = config
        self.collaborators = collaborators
        self.stack = stack

    def readiness(self) -> ReadinessFacts:
        c, breaker = self.collaborators, self.stack.breaker
        models, registry = c.models, c.models.registry
        current = self.config.models.enabled and registry.fresh and registry.refresh_unreachable
        return ReadinessFacts(
            preload_pending=() if models.ready else tuple(sorted(models.warmer.pending)),
            draining=c.drain.draining,
            preloaded=c.telemetry.preloaded,
            circuit=breaker.states().get(breaker.name) if breaker is not None else None,
            unreachable=registry.refresh_error if current else None,
        )

    async def models(self) -> dict[str, Any]:
        service = self.collaborators.models
        await service.registry.refresh()  # on demand, when older than models.refresh_s
        return service.snapshot()

    def expected_load_s(self, model: str) -> float | None:
        return self.collaborators.models.registry.expected_load_s(model)

    def drain(self) -> DrainFacts:
        drain = self.collaborators.drain
        return DrainFacts(draining=drain.draining, in_flight=drain.in_flight)

    def concurrency(self) -> dict[str, Any]:
        concurrency = self.stack.concurrency
        return dict(concurrency.snapshot()) if concurrency is not None else {}

    def breakers(self) -> dict[str, str]:
        breaker = self.stack.breaker
        return breaker.states() if breaker is not None else {}

    def latency(self) -> dict[str, Any]:
        windows = self.collaborators.telemetry.windows
        return {model: windows.summary(model) for model in windows.models()}

    def cache(self) -> dict[str, Any] | None:
        cache = self.stack.cache
        if cache is None:
            return None
        stats = cache.store.stats()
        return {"entries": stats.entries, "bytes": stats.bytes, "evictions": stats.evictions, "lookups": dict(cache.results)}

    def metrics(self, accept: str | None) -> tuple[bytes, str] | None:
        metrics = self.collaborators.telemetry.metrics
        return metrics.render(accept) if metrics is not None else None

    async def llm_health(self) -> tuple[int, dict[str, Any]]:
        return await self.collaborators.telemetry.llm_health.report()
