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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import httpx
from opentelemetry.sdk.trace import TracerProvider

from gateway.admin.openapi import openapi_document
from gateway.admin.routes import AdminRoutes, is_admin_path, requires_admin_key
from gateway.admin.status import RequestBoard, StatusPage
from gateway.admin.view import DrainFacts, GatewayView, ReadinessFacts
from gateway.config.settings import Config
from gateway.models import ModelService
from gateway.models.admin import merged_snapshot, serve_models
from gateway.models.coldstart import ColdStartMiddleware, early_headers, heartbeat_describer
from gateway.proxy.aiohttp_transport import pool_counts
from gateway.proxy.relay import Proxy
from gateway.proxy.websocket import SdkSockets, SocketLimits, SocketTarget, WebSocketRelay
from gateway.request.routes import RequestNormalisation, RouteTable, route_path
from gateway.request.validation import RequestValidation
from gateway.telemetry import AdmissionMark, Telemetry, TelemetryMiddleware
from gateway.telemetry.metrics import WatchedUpstream, WebSocketMetrics
from gateway.upstreams.router import Route, Router, chosen_upstream, upstream_headers
from gateway.upstreams.upstream import Upstream, build_upstreams, make_upstream_client
from middleware.auth import AuthMiddleware, client_identity, loopback_client
from middleware.body import BodyDeadlines
from middleware.cache import CacheMiddleware, CacheStore, MemoryStore
from middleware.circuit_breaker import CircuitBreakerMiddleware
from middleware.concurrency import ConcurrencyMiddleware
from middleware.drain import DrainMiddleware, DrainState
from middleware.embeddings import Base64EmbeddingsMiddleware
from middleware.errors import ErrorMiddleware
from middleware.heartbeat import HeartbeatMiddleware
from middleware.retry import RetryMiddleware
from middleware.slots import SharedSlots
from middleware.timeout import TimeoutMiddleware
from middleware.types import ASGIApp, Receive, Scope, Send

__all__ = ["Collaborators", "GatewaySnapshot", "Layer", "Stack", "build_collaborators", "build_stack", "make_upstream_client"]

if TYPE_CHECKING:  # gateway.state imports redis-py (~8 MB): only a gateway with state.redis_url loads it
    from gateway.state import SharedState

_T = TypeVar("_T")


# -- the shared objects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Collaborators:
    """The objects several layers (and lmgate's own routes) share, built once per gateway."""

    upstreams: tuple[Upstream, ...]  # each with its pooled client, model service and proxy
    drain: DrainState
    telemetry: Telemetry
    board: RequestBoard  # the status page's memory of recent requests
    routes: RouteTable
    state: SharedState | None = None  # Redis shared by the replicas (state.redis_url); None: this process alone

    @property
    def upstream(self) -> Upstream:
        """The first upstream (the only one, unless ``upstreams:`` lists several)."""
        return self.upstreams[0]

    @property
    def client(self) -> httpx.AsyncClient:
        return self.upstream.client

    @property
    def models(self) -> ModelService:
        return self.upstream.models

    @property
    def proxy(self) -> Proxy:
        return self.upstream.proxy


def build_collaborators(
    config: Config,
    *,
    env: Mapping[str, str] | None = None,
    drain: DrainState | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Collaborators:
    """The shared objects for ``config``, wired to each other (not yet to any layer)."""
    routes = RouteTable(extra_prefixes=config.routes.extra_prefixes)
    upstreams = build_upstreams(config, routes=routes, env=env)
    first = upstreams[0]
    telemetry = Telemetry.from_config(
        config, client=first.client, api_key=first.api_key, tracer_provider=tracer_provider, upstream_of=chosen_upstream
    )
    for upstream in upstreams:
        upstream.models.on_load = telemetry.load_observer(upstream.name)  # loads counted by upstream
        if upstream is not first:
            telemetry.instrument(upstream.client)
    board = RequestBoard()
    telemetry.on_request_end.append(board.observe)
    state = _shared_state(config)
    if state is not None:  # with Redis, one load per model and one listing reader across replicas (docs/shared-state.md)
        from gateway.state.listings import RedisListings
        from gateway.state.loads import RedisLoads

        for upstream in upstreams:
            upstream.models.loader.shared = RedisLoads(state, scope=upstream.name)
            upstream.models.registry.shared = RedisListings(state, scope=upstream.name, refresh_s=config.models.refresh_s)
    return Collaborators(
        upstreams=upstreams, drain=drain or DrainState(), telemetry=telemetry, board=board, routes=routes, state=state,
    )  # fmt: skip


def _shared_state(config: Config) -> SharedState | None:
    """Redis shared by the replicas, if ``state.redis_url`` asks for it; imported only then."""
    if config.state.redis_url is None:
        return None
    from gateway.state import SharedState

    return SharedState.from_config(config.state)


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
        self.upstreams: dict[str, Stack] = {}  # with several upstreams: each one's own layers, by name
        self.router: Router | None = None  # with several upstreams: the choice between them
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
    """Every layer of the request path, outermost first (docs/architecture.md says what each does).

    With several upstreams the layers above the router are shared, and each upstream gets the
    layers below it around its own proxy (docs/upstreams.md); with one, the router is left out.
    """
    c, stack = collaborators, Stack()
    shared = (
        _errors(),  # ErrorMiddleware: every LmgateError as OpenAI-shaped JSON; unknown errors -> logged 500
        _request_normalisation(c),  # RequestNormalisation: the canonical path (400 if none), no credentials in the query
        _sdk_sockets(config, c, stack),  # SdkSockets: LM Studio SDK WebSockets -> WebSocketRelay; the SDK's probe
        _auth(config),  # AuthMiddleware: client keys (401), admin keys (403); off without keys
        _body_deadlines(config),  # BodyDeadlines: 408 for a request body that stalls
        _own_routes(config, c, GatewaySnapshot(config, c, stack)),  # OwnRoutes -> AdminRoutes: /healthz, /lmgate/...
        _telemetry(c),  # TelemetryMiddleware: logs, metrics and the span of each forwarded request, once
        _request_validation(config, c),  # RequestValidation: 4xx for what the upstream cannot serve
        _per_key_concurrency(config, c),  # ConcurrencyMiddleware per client key (auth.per_key_limit): 429
        _drain(config, c),  # DrainMiddleware: 503 draining once shutdown began
        _cache(config, c),  # CacheMiddleware: repeated deterministic requests answered from memory
        _base64_embeddings(config),  # Base64EmbeddingsMiddleware: float embeddings encoded for base64 clients
        _heartbeat(config, c),  # HeartbeatMiddleware: SSE comments in silences; starts a slow stream early
    )

    def per_upstream(upstream: Upstream) -> tuple[Layer | None, ...]:
        return (
            _cold_start(config, upstream),  # ColdStartMiddleware: loads a cold model first (single flight)
            _concurrency(config, c, upstream),  # ConcurrencyMiddleware: the limit and a bounded FIFO queue (shared on Redis)
            _admission_mark(c),  # AdmissionMark: notes the queue wait for telemetry
            _timeout(config),  # TimeoutMiddleware: first token / idle / total (retries included)
            _retry(config),  # RetryMiddleware: only before the first byte reaches the client
            _circuit_breaker(config, c, upstream),  # CircuitBreakerMiddleware: per attempt
        )  # then Proxy: httpx stream to the upstream, one chunk in, one chunk out

    if len(c.upstreams) == 1:
        stack.build(*shared, *per_upstream(c.upstream), app=c.proxy)
    else:
        for upstream in c.upstreams:
            stack.upstreams[upstream.name] = Stack().build(*per_upstream(upstream), app=upstream.proxy)
        stack.router = router = _router(config, c, stack)
        health = c.telemetry.llm_health  # each model checked where a request for it would go
        for upstream in c.upstreams[1:]:
            health.add_target(upstream.name, upstream.client, upstream.url, api_key=upstream.api_key)
        health.place = router.first_choice
        stack.build(*shared, app=stack.router)  # Router: where the model is warm (gateway/upstreams/router.py)
    _watch(stack, c)
    return stack


def _watch(stack: Stack, c: Collaborators) -> None:
    """Expose the stateful layers to telemetry at scrape time (cache size, retries, circuits, slots)."""
    metrics = c.telemetry.metrics
    cache = stack.cache
    if cache is not None and metrics is not None:
        metrics.watch_cache(cache.store)
    if c.state is not None and metrics is not None:
        metrics.registry.register(c.state.collector())
    router = stack.router
    watched = {
        upstream.name: WatchedUpstream(
            retry=own.retry,
            breaker=own.breaker,
            concurrency=own.concurrency,
            reachable=partial(router.reachable, upstream.name) if router is not None else None,
            connections=pool_counts(upstream.client),
        )
        for upstream in c.upstreams
        for own in (stack.upstreams.get(upstream.name, stack),)  # one upstream: its layers are the stack's
    }
    c.telemetry.watch(drain=c.drain, upstreams=watched, routing=router.stats if router is not None else None)


# -- the layers, in stack order ----------------------------------------------------------------


def _errors() -> Layer:
    return Layer("errors", ErrorMiddleware)


def _request_normalisation(c: Collaborators) -> Layer:
    # Outside auth: the request target is rewritten to its canonical form once, before any
    # decision reads it (gateway/request/paths.py); the proxy forwards that same form.
    return Layer("request_normalisation", lambda app: RequestNormalisation(app, routes=c.routes))


def _sdk_sockets(config: Config, c: Collaborators, stack: Stack) -> Layer:
    # Above auth: the SDK sends its key in its first message, not in a header, and probes the
    # greeting without one (gateway/proxy/websocket.py). Built after auth (inside it), so its keys are read once.
    ws = config.websockets

    def wrap(app: ASGIApp) -> ASGIApp:
        keys = stack.layer("auth", AuthMiddleware)
        relay = None
        if ws.enabled:
            metrics, tracing = c.telemetry.metrics, c.telemetry.tracing
            relay = WebSocketRelay(
                targets=[SocketTarget(u.name, u.url, u.api_key, u.config.forward_client_auth) for u in c.upstreams],
                keys=keys,
                drain=c.drain,
                limits=SocketLimits(
                    max_open=config.websocket_cap(),
                    max_message_bytes=ws.max_message_bytes,
                    auth_timeout_s=ws.auth_timeout_s,
                    connect_timeout_s=config.timeouts.connect_s,
                ),
                reachable=lambda name: stack.router.reachable(name) if stack.router is not None else True,
                metrics=WebSocketMetrics(metrics.registry) if metrics is not None else None,
                tracer=tracing.tracer if tracing is not None else None,
            )
        return SdkSockets(app, relay=relay, keys_on=keys is not None and keys.enabled)

    return Layer("sdk_sockets", wrap)


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
    services = {upstream.name: upstream.models for upstream in c.upstreams}

    async def choose(model: str) -> str:
        # A load the admin asked for goes where a request for the model would (built by then).
        router = view.router if isinstance(view, GatewaySnapshot) else None
        return await router.first_choice(model) if router is not None else c.upstream.name

    async def serve_model_routes(scope: Scope, receive: Receive, send: Send) -> None:
        await serve_models(services, scope, send, choose=choose, pins=config.models.pin)

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
            routes=c.routes,
            body_limit_bytes=limits.body_bytes,
            header_limit_bytes=limits.header_bytes,
            url_limit_bytes=limits.url_bytes,
        ),
    )


def _redis_slots(state: SharedState | None, scope: str) -> SharedSlots | None:
    """Concurrency slots counted across replicas on ``state``'s Redis (None: this replica alone)."""
    if state is None:
        return None
    from gateway.state import RedisSlots

    return RedisSlots(state, scope=scope)


def _per_key_concurrency(config: Config, c: Collaborators) -> Layer | None:
    # 429 for one key over its share, before the shared queue.
    auth = config.auth
    if auth.per_key_limit is None:
        return None
    limit = auth.per_key_limit
    # With Redis, a key's requests are counted across every replica ("@keys": no upstream has that name).
    shared = _redis_slots(c.state, "@keys")
    return Layer(
        "per_key_concurrency",
        lambda app: ConcurrencyMiddleware(
            app,
            limit=limit,
            max_queue=auth.per_key_queue,
            max_wait_s=config.concurrency.max_wait_s,
            client_key=client_identity,
            shared=shared,
            fallback_limit_share=config.state.fallback_limit_share,
        ),
    )


def _drain(config: Config, c: Collaborators) -> Layer:
    return Layer("drain", lambda app: DrainMiddleware(app, state=c.drain, retry_after_s=config.drain.retry_after_s))


def _cache(config: Config, c: Collaborators) -> Layer | None:
    # Outside the model layers: a hit neither loads a model nor takes a slot.
    cache, metrics = config.cache, c.telemetry.metrics
    if not cache.enabled:
        return None
    memory = MemoryStore(max_entries=cache.max_entries, max_bytes=cache.max_bytes)
    store: CacheStore = memory
    if c.state is not None:  # with Redis, every replica's hits (the memory store while Redis cannot answer)
        from gateway.state.cache import RedisCacheStore

        store = RedisCacheStore(c.state, fallback=memory, max_entry_bytes=cache.max_entry_bytes)
    return Layer(
        "cache",
        lambda app: CacheMiddleware(
            app,
            store=store,
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
            describe=heartbeat_describer(status_events=options.status_events),
            # A stream started early carries the model state (with cold starts on) and, with
            # several upstreams, the upstream chosen so far.
            start_headers=_early_headers(options.enabled, several=len(c.upstreams) > 1),
            body_limit_bytes=config.limits.body_bytes,
        ),
    )


def _early_headers(cold_starts: bool, *, several: bool) -> Callable[[Scope], list[tuple[bytes, bytes]]] | None:
    if not several:
        return early_headers if cold_starts else None
    if not cold_starts:
        return upstream_headers
    return lambda scope: [*early_headers(scope), *upstream_headers(scope)]


def _cold_start(config: Config, upstream: Upstream) -> Layer | None:
    options = config.models
    if not options.enabled:
        return None
    return Layer(
        "cold_start",
        lambda app: ColdStartMiddleware(
            app,
            registry=upstream.models.registry,
            loader=upstream.models.loader,
            on_loading=options.on_loading,
            body_limit_bytes=config.limits.body_bytes,
        ),
    )


def _concurrency(config: Config, collaborators: Collaborators, upstream: Upstream) -> Layer | None:
    c = config.concurrency_for(upstream.config)
    if not c.enabled:
        return None
    # With Redis, every replica counts against the same slots and queue (docs/shared-state.md).
    state = collaborators.state
    shared = _redis_slots(state, upstream.name)
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
            shared=shared,
            fallback_limit_share=config.state.fallback_limit_share,
        ),
    )


def _router(config: Config, c: Collaborators, stack: Stack) -> Router:
    return Router(
        [
            Route(upstream=upstream, app=sub, concurrency=sub.concurrency, breaker=sub.breaker)
            for upstream in c.upstreams
            for sub in (stack.upstreams[upstream.name],)
        ],
        pins=config.models.pin,
        failover_statuses=config.retry.retry_statuses,
        body_limit_bytes=config.limits.body_bytes,
        list_timeout_s=config.timeouts.connect_s,
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


def _circuit_breaker(config: Config, c: Collaborators, upstream: Upstream) -> Layer | None:
    cb = config.circuit_breaker
    if not cb.enabled:
        return None
    # With Redis, every replica opens and half-opens together (docs/shared-state.md).
    shared = None
    if c.state is not None:
        from gateway.state.breakers import RedisCircuits

        shared = RedisCircuits(c.state, scope=upstream.name)
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
            on_state_change=c.telemetry.circuit_observer(upstream.name),
            # One upstream keeps the name its circuit always had; several are told apart by theirs.
            name="upstream" if len(c.upstreams) == 1 else upstream.name,
            shared=shared,
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

    @property
    def router(self) -> Router | None:
        return self.stack.router

    def _upstreams(self) -> list[tuple[Upstream, Stack]]:
        """Each upstream with the stack holding its own layers."""
        stack = self.stack
        return [(u, stack.upstreams.get(u.name, stack)) for u in self.collaborators.upstreams]

    def readiness(self) -> ReadinessFacts:
        # Ready while one upstream can serve: not every circuit open, not every upstream unreachable.
        c = self.collaborators
        pending: set[str] = set()
        circuits: list[str] = []
        unreachable: list[str] = []
        for upstream, own in self._upstreams():
            models, registry, breaker = upstream.models, upstream.models.registry, own.breaker
            if not models.ready:
                pending.update(models.warmer.pending)
            if breaker is not None:
                circuits.append(breaker.state_of())
            if self.config.models.enabled and registry.fresh and registry.refresh_unreachable:
                unreachable.append(registry.refresh_error or "unreachable")
        return ReadinessFacts(
            preload_pending=tuple(sorted(pending)),
            draining=c.drain.draining,
            preloaded=c.telemetry.preloaded,
            circuit=_overall_circuit(circuits),
            unreachable=None if len(unreachable) < len(c.upstreams) else "; ".join(unreachable),
            shared_state=None if c.state is None else ("available" if c.state.available else "unavailable"),
        )

    async def models(self) -> dict[str, Any]:
        upstreams = self.collaborators.upstreams
        async with anyio.create_task_group() as tg:
            for upstream in upstreams:
                tg.start_soon(upstream.models.registry.refresh)  # on demand, when older than models.refresh_s
        if len(upstreams) == 1:
            return upstreams[0].models.snapshot()
        return merged_snapshot({u.name: u.models.snapshot() for u in upstreams})

    def expected_load_s(self, model: str) -> float | None:
        known = (u.models.registry.expected_load_s(model) for u in self.collaborators.upstreams)
        return next((seconds for seconds in known if seconds is not None), None)

    def drain(self) -> DrainFacts:
        drain = self.collaborators.drain
        return DrainFacts(draining=drain.draining, in_flight=drain.in_flight)

    def concurrency(self) -> dict[str, Any]:
        # Keys are the limiter's ("*" or a model); with several upstreams "<upstream>/<key>".
        several = len(self.collaborators.upstreams) > 1
        merged: dict[str, Any] = {}
        for upstream, own in self._upstreams():
            concurrency = own.concurrency
            if concurrency is not None:
                for key, value in concurrency.snapshot().items():
                    merged[f"{upstream.name}/{key}" if several else key] = value
        return merged

    def breakers(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for _, own in self._upstreams():
            if own.breaker is not None:
                merged.update(own.breaker.states())  # keyed by the upstream's name (or "upstream")
        return merged

    def upstreams(self) -> list[dict[str, Any]]:
        """One card per upstream: where it is, whether it answers, its slots, circuit and models."""
        cards = []
        router = self.stack.router
        for upstream, own in self._upstreams():
            registry = upstream.models.registry
            concurrency = own.concurrency
            pressure = concurrency.pressure() if concurrency is not None else None
            cards.append(
                {
                    "name": upstream.name,
                    "url": upstream.url,
                    "reachable": registry.refresh_error is None and registry.refreshed_at is not None
                    and (router is None or router.reachable(upstream.name)),
                    "refresh_error": registry.refresh_error,
                    "circuit": own.breaker.state_of() if own.breaker is not None else None,
                    "slots": None if pressure is None else {
                        "limit": pressure.limit, "in_flight": pressure.in_flight, "queued": pressure.queued
                    },
                    "loaded": sorted(r.id for r in registry.records.values() if r.state == "loaded"),
                    "loading": upstream.models.loader.loading,  # other replicas' loads too (shared state)
                }
            )
        return cards

    def latency(self) -> dict[str, Any]:
        windows = self.collaborators.telemetry.windows
        return {model: windows.summary(model) for model in windows.models()}

    def cache(self) -> dict[str, Any] | None:
        cache = self.stack.cache
        if cache is None:
            return None
        store = cache.store
        stats = store.stats()
        document: dict[str, Any] = {
            "entries": stats.entries, "bytes": stats.bytes, "evictions": stats.evictions, "lookups": dict(cache.results),
        }  # fmt: skip
        shared_stats = getattr(store, "shared_stats", None)  # a RedisCacheStore (gateway.state: imported only with Redis)
        if shared_stats is not None:  # the numbers above are then the local fallback store's
            shared = shared_stats()
            document["shared"] = None if shared is None else {"entries": shared.entries, "bytes": shared.bytes}
        return document

    def shared_state(self) -> dict[str, Any] | None:
        state = self.collaborators.state
        return None if state is None else state.snapshot()

    def metrics(self, accept: str | None) -> tuple[bytes, str] | None:
        metrics = self.collaborators.telemetry.metrics
        return metrics.render(accept) if metrics is not None else None

    async def llm_health(self) -> tuple[int, dict[str, Any]]:
        return await self.collaborators.telemetry.llm_health.report()


def _overall_circuit(states: list[str]) -> str | None:
    """The upstream-wide circuit readiness goes by: the one there is, or "open" only when every
    upstream's is (with one closed or probing, requests are still served)."""
    if not states:
        return None
    if len(states) == 1:
        return states[0]
    return "open" if all(state == "open" for state in states) else "closed"
