"""``build_app(config)``: the gateway as one ASGI app, for hypercorn, any ASGI server, or mounting.

The request path is declared in ``gateway.stack.build_stack``, one line per layer, outermost
first; docs/architecture.md lists the layers with what each does and the folder layout around
them. :class:`Gateway` adds the ASGI lifespan (the model service's background work, closing the
upstream pool) and keeps the shared objects at hand for inspection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

from opentelemetry.sdk.trace import TracerProvider

from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from gateway.stack import Collaborators, Stack, build_collaborators, build_stack
from gateway.upstreams.upstream import make_upstream_client
from middleware.cache import CacheMiddleware
from middleware.circuit_breaker import CircuitBreakerMiddleware
from middleware.concurrency import ConcurrencyMiddleware
from middleware.drain import DrainState
from middleware.retry import RetryMiddleware
from middleware.types import Receive, Scope, Send

__all__ = ["Gateway", "build_app", "make_upstream_client"]


class Gateway:
    """The composed gateway: :attr:`stack` plus the lifespan; the shared objects for inspection."""

    def __init__(
        self,
        config: Config,
        *,
        env: Mapping[str, str] | None = None,
        drain: DrainState | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config
        self.collaborators: Collaborators = build_collaborators(config, env=env, drain=drain, tracer_provider=tracer_provider)
        self.stack: Stack = build_stack(config, collaborators=self.collaborators)
        # The shared objects, where tests, `lmgate serve` and mounting apps reach them.
        self.client = self.collaborators.client
        self.drain = self.collaborators.drain
        self.telemetry = self.collaborators.telemetry
        self.models = self.collaborators.models
        self.proxy = self.collaborators.proxy

    @property
    def breaker(self) -> CircuitBreakerMiddleware | None:
        return self.stack.breaker

    @property
    def retry(self) -> RetryMiddleware | None:
        return self.stack.retry

    @property
    def concurrency(self) -> ConcurrencyMiddleware | None:
        return self.stack.concurrency

    @property
    def cache(self) -> CacheMiddleware | None:
        return self.stack.cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.stack(scope, receive, send)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The background work of every upstream's model service (loads, state refresh, preload,
        keep-warm), of the router and of the shared state (Redis probe, lease renewals), for the block."""
        async with AsyncExitStack() as background:
            if self.collaborators.state is not None:  # first: shared decisions are probed before traffic
                await background.enter_async_context(self.collaborators.state.running())
            for upstream in self.collaborators.upstreams:
                await background.enter_async_context(upstream.models.running())
            if self.stack.router is not None:
                await background.enter_async_context(self.stack.router.running())
            yield

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        async with self.running():
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
        for upstream in self.collaborators.upstreams:
            await upstream.client.aclose()
        await self.telemetry.aclose()


def build_app(
    config: Config | None = None,
    *,
    env: Mapping[str, str] | None = None,
    drain: DrainState | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Gateway:
    """The gateway as an ASGI app. ``config`` defaults to all defaults (upstream 127.0.0.1:1234)."""
    return Gateway(config or Config(), env=env, drain=drain, tracer_provider=tracer_provider)


@asynccontextmanager
async def serve_gateway(
    config: Config | None = None, *, host: str = "127.0.0.1", port: int = 0, tracer_provider: TracerProvider | None = None
) -> AsyncIterator[tuple[str, Gateway]]:
    """lmgate built from ``config`` and served on hypercorn (a free port by default) until the block
    exits: ``(url, gateway)``. For test suites and embedding; ``lmgate serve`` adds signals and drain."""
    app = build_app(config, tracer_provider=tracer_provider)
    try:
        async with serve_in_background(app, host=host, port=port) as server:
            yield server.url, app
    finally:
        await app.aclose()
