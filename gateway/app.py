"""``build_app(config)``: the gateway as one ASGI app, for hypercorn, any ASGI server, or mounting.

The request path, outermost first (read it like Envoy's filter list)::

    ErrorMiddleware                      renders every LmgateError; unknown errors -> logged 500
    RequestNormalisation                 the canonical path (400 if none), credentials out of the query
    AuthMiddleware                       client keys (401), admin keys (403); off without keys
    BodyDeadlines                        408 for a request body that stalls (limits.body_idle_s, body_total_s)
      ├── lmgate's own routes            /healthz, /readyz, /metrics, /lmgate/...
      └── TelemetryMiddleware            logs, metrics and the span of each request, once
          RequestValidation              4xx for what the upstream cannot serve (gateway/request/validation.py)
          ConcurrencyMiddleware          per client key (auth.per_key_limit): 429 rate_limited
          DrainMiddleware                503 draining once shutdown began
          CacheMiddleware                repeated deterministic requests answered from memory (cache.enabled)
          Base64EmbeddingsMiddleware     float embeddings encoded for clients that asked for base64
          HeartbeatMiddleware            SSE comments in silences; starts a slow event stream early
          ColdStartMiddleware            loads a cold model first (single flight); X-Lmgate-Model-State
            ConcurrencyMiddleware        limit + bounded FIFO queue
              AdmissionMark              notes the queue wait for telemetry
              TimeoutMiddleware          first token / idle / total (retries included)
                RetryMiddleware          only before the first byte reaches the client
                  CircuitBreakerMiddleware   per attempt
                    Proxy                httpx stream to LM Studio, one chunk in, one chunk out

lmgate's own routes skip the resilience layers: a health check must answer while the upstream
queue is full or the circuit is open.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import httpx
from opentelemetry.sdk.trace import TracerProvider

from gateway.admin.routes import AdminRoutes, is_admin_path, requires_admin_key
from gateway.config.settings import Config
from gateway.models import ModelService
from gateway.proxy.relay import Proxy
from gateway.admin.status import StatusPage
from gateway.request.routes import RequestNormalisation, RouteTable, route_path
from gateway.telemetry import Telemetry
from gateway.proxy.transport import FramingGuard
from gateway.request.validation import RequestValidation
from middleware.auth import AuthMiddleware, client_identity, loopback_client
from middleware.body import BodyDeadlines
from middleware.cache import CacheMiddleware, MemoryStore
from middleware.circuit_breaker import CircuitBreakerMiddleware
from middleware.concurrency import ConcurrencyMiddleware
from middleware.drain import DrainMiddleware, DrainState
from middleware.embeddings import Base64EmbeddingsMiddleware
from middleware.errors import ErrorMiddleware
from middleware.retry import RetryMiddleware
from middleware.timeout import TimeoutMiddleware
from middleware.types import ASGIApp, Receive, Scope, Send


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

    The transport is httpx's own behind a :class:`FramingGuard`: a connection the upstream sent
    more on than its response declared is closed, never handed to another client's request.
    """
    timeouts = config.timeouts
    pool = config.upstream.pool
    limits = httpx.Limits(
        max_connections=config.upstream_pool_connections(),
        max_keepalive_connections=pool.max_keepalive_connections,
        keepalive_expiry=pool.keepalive_expiry_s,
    )
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=timeouts.connect_s,
            read=timeouts.total_s,
            write=timeouts.total_s,
            pool=config.concurrency.max_wait_s,
        ),
        transport=FramingGuard(httpx.AsyncHTTPTransport(limits=limits, trust_env=False)),
        follow_redirects=False,
        trust_env=False,
    )


class Gateway:
    """The composed gateway. Holds the shared objects (client, drain state, layers) for inspection."""

    def __init__(
        self,
        config: Config,
        *,
        env: Mapping[str, str] | None = None,
        drain: DrainState | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.config = config
        self.client = make_upstream_client(config)
        self.drain = drain or DrainState()
        self.telemetry = Telemetry.from_config(
            config, client=self.client, api_key=config.upstream.resolved_api_key(env), tracer_provider=tracer_provider
        )
        self.proxy = Proxy(
            client=self.client,
            upstream_url=config.upstream.url,
            routes=RouteTable(extra_prefixes=config.routes.extra_prefixes),
            api_key=config.upstream.resolved_api_key(env),
            forward_client_auth=config.upstream.forward_client_auth,
            assemble_non_streaming=config.routes.assemble_non_streaming,
            normalise_errors=config.routes.normalise_errors,
            body_limit_bytes=config.limits.body_bytes,
            assembled_limit_bytes=config.limits.assembled_bytes,
            frame_limit_bytes=config.limits.frame_bytes,
        )
        stack: ASGIApp = self.proxy
        self.breaker: CircuitBreakerMiddleware | None = None
        if config.circuit_breaker.enabled:
            cb = config.circuit_breaker
            stack = self.breaker = CircuitBreakerMiddleware(
                stack,
                failure_threshold=cb.failure_threshold,
                failure_ratio=cb.failure_ratio,
                window_s=cb.window_s,
                min_requests=cb.min_requests,
                reset_timeout_s=cb.reset_timeout_s,
                half_open_max_probes=cb.half_open_max_probes,
                per_model=cb.per_model,
                body_limit_bytes=config.limits.body_bytes,
                on_state_change=self.telemetry.circuit_changed,
            )
        self.retry: RetryMiddleware | None = None
        if config.retry.enabled and config.retry.max_retries > 0:
            r = config.retry
            stack = self.retry = RetryMiddleware(
                stack,
                max_retries=r.max_retries,
                backoff_base_s=r.backoff_base_s,
                backoff_max_s=r.backoff_max_s,
                jitter=r.jitter,
                retry_statuses=r.retry_statuses,
                max_retry_after_s=r.max_retry_after_s,
                body_limit_bytes=min(r.body_limit_bytes, config.limits.body_bytes),
                budget_ratio=r.budget_ratio,
                budget_min_retries=r.budget_min_retries,
            )
        t = config.timeouts
        stack = TimeoutMiddleware(
            stack,
            first_token_s=t.first_token_s,
            idle_s=t.idle_s,
            total_s=t.total_s,
            per_model={
                model: overrides.model_dump(exclude_none=True) for model, overrides in t.per_model.items()
            },
            body_limit_bytes=config.limits.body_bytes,
        )
        stack = self.telemetry.admission(stack)
        self.concurrency: ConcurrencyMiddleware | None = None
        if config.concurrency.enabled:
            c = config.concurrency
            stack = self.concurrency = ConcurrencyMiddleware(
                stack,
                limit=c.limit,
                max_queue=c.max_queue,
                max_wait_s=c.max_wait_s,
                per_model=c.per_model,
                adaptive=c.adaptive,
                min_limit=min(c.min_limit, c.limit),
                max_limit=max(c.max_limit, c.limit),
                latency_threshold_s=c.latency_threshold_s,
            )
        # Outside concurrency and the timeout: heartbeats cover the queue and the load, and the
        # first-token clock starts once the model is loaded (docs/cold-starts.md).
        self.models = ModelService.from_config(
            config, client=self.client, api_key=config.upstream.resolved_api_key(env), on_load=self.telemetry.model_load
        )
        stack = self.models.wrap(stack, body_limit_bytes=config.limits.body_bytes)
        self.proxy.model_info = self.models.model_info  # /api/v0 answers lmgate assembles
        stack = Base64EmbeddingsMiddleware(stack, body_limit_bytes=config.limits.body_bytes, path_of=route_path)
        self.cache: CacheMiddleware | None = None
        if config.cache.enabled:  # outside the model layers: a hit neither loads a model nor takes a slot
            c, metrics = config.cache, self.telemetry.metrics
            store = MemoryStore(max_entries=c.max_entries, max_bytes=c.max_bytes)
            stack = self.cache = CacheMiddleware(
                stack,
                store=store,
                ttl_s=c.ttl_s,
                max_entry_bytes=c.max_entry_bytes,
                on_result=metrics.cache_result if metrics is not None else None,
                path_of=route_path,
                body_limit_bytes=config.limits.body_bytes,
            )
            if metrics is not None:
                metrics.watch_cache(store)
        stack = DrainMiddleware(stack, state=self.drain, retry_after_s=config.drain.retry_after_s)
        auth = config.auth
        if auth.per_key_limit is not None:  # 429 for one key over its share, before the shared queue
            stack = ConcurrencyMiddleware(
                stack,
                limit=auth.per_key_limit,
                max_queue=auth.per_key_queue,
                max_wait_s=config.concurrency.max_wait_s,
                client_key=client_identity,
            )
        limits = config.limits
        stack = RequestValidation(
            stack,
            routes=self.proxy.routes,
            body_limit_bytes=limits.body_bytes,
            header_limit_bytes=limits.header_bytes,
            url_limit_bytes=limits.url_bytes,
        )
        self.forward: ASGIApp = self.telemetry.middleware(stack)
        self.telemetry.watch(drain=self.drain, retry=self.retry, breaker=self.breaker, concurrency=self.concurrency)
        self.admin = AdminRoutes(self)
        self.status = StatusPage(self)  # GET /lmgate/ and /lmgate/status.json
        # Outside telemetry: a client without a key cannot make lmgate read, log or time its body.
        # Outside auth: the request target is rewritten to its canonical form once, before any
        # decision reads it (gateway/request/paths.py); the proxy forwards that same form.
        self._app = ErrorMiddleware(
            RequestNormalisation(
                AuthMiddleware(
                    # Whichever layer reads a body first (telemetry, admin, proxy), it cannot wait for ever.
                    BodyDeadlines(self._route, idle_s=config.limits.body_idle_s, total_s=config.limits.body_total_s),
                    key_digests=auth.digests(),
                    admin_digests=auth.admin_keys,
                    open_paths=auth.open_paths,
                    open_from=loopback_client if auth.open_from == "loopback" else lambda scope: True,
                    requires_admin=requires_admin_key,
                    path_of=route_path,
                ),
                routes=self.proxy.routes,
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._app(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_admin_path(route_path(scope)):
            await self.admin(scope, receive, send)
        else:
            await self.forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        async with self.models.running():  # background loads, state refresh, preload, keep-warm
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    break
        await self.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    async def aclose(self) -> None:
        """Close the upstream connection pool and flush traces (done by the lifespan; call it when mounted)."""
        await self.client.aclose()
        await self.telemetry.aclose()


def build_app(config: Config | None = None, **kwargs: object) -> Gateway:
    """The gateway as an ASGI app. ``config`` defaults to all defaults (upstream 127.0.0.1:1234)."""
    return Gateway(config or Config(), **kwargs)  # type: ignore[arg-type]
