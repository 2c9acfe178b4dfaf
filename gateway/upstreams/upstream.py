"""``Upstream``: one server lmgate forwards to, with the objects lmgate keeps for it.

Each upstream has its own pooled HTTP client (sized from its own concurrency limit), its own
model service (registry, single-flight loader, preload and keep-warm) and its own proxy; the
layers that act per upstream (cold start, concurrency, timeout, retry, circuit breaker) are
stacked around its proxy by ``gateway.stack``. Nothing is shared between upstreams, so one that
fails or stalls never holds up another.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from gateway.config.settings import Config, UpstreamConfig
from gateway.models import ModelService
from gateway.models.service import LoadObserver
from gateway.proxy.aiohttp_transport import AiohttpTransport
from gateway.proxy.relay import Proxy
from gateway.proxy.transport import FramingGuard
from gateway.request.routes import RouteTable

__all__ = ["Upstream", "build_upstreams", "make_upstream_client"]


@dataclass(frozen=True)
class Upstream:
    """One server and what lmgate keeps for it (see the module docstring)."""

    name: str
    config: UpstreamConfig
    client: httpx.AsyncClient
    api_key: str | None
    models: ModelService
    proxy: Proxy

    @property
    def url(self) -> str:
        return self.config.url


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: one pooled client serves every caller, so a cookie the
    upstream sets for one must never be stored, let alone sent with another's request. It also
    spares httpx's parsing of every response's headers for cookies (about 85 us a request)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        return None


class UpstreamClient(httpx.AsyncClient):
    """httpx's client without a cookie jar (:class:`_NoCookies`)."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        return None


def make_upstream_client(config: Config, upstream: UpstreamConfig | None = None) -> httpx.AsyncClient:
    """The pooled client for ``upstream`` (default: the first), with explicit timeouts.

    httpx's default 5 s read timeout would cut every model load; the read timeout here is only a
    backstop at the total deadline, while the timeout middleware enforces the real deadlines.
    ``trust_env=False``: an HTTP_PROXY variable must never reroute traffic meant for localhost.

    One limit governs: the pool is sized from the upstream's concurrency limit
    (``Config.upstream_pool_connections``), so requests wait in lmgate's queue, where they are
    bounded, counted and told when to retry, not in the pool. A wait for a connection that
    remains (an explicit pool with per-model limits or without a limit) lasts at most
    ``concurrency.max_wait_s``, like a wait in the queue, and is refused like one
    (``translate_transport_error``: 503 ``overloaded``).

    The transport (``upstream.transport``) is lmgate's :class:`AiohttpTransport` (httpx's API over
    aiohttp's I/O, gateway/proxy/aiohttp_transport.py), or httpx's own behind a
    :class:`FramingGuard`. Either way a connection the upstream sent more on than its response
    declared is closed, never handed to another client's request.
    """
    upstream = upstream or config.upstream_list()[0]
    timeouts = config.timeouts
    pool = upstream.pool
    limits = httpx.Limits(
        max_connections=config.upstream_pool_connections(upstream),
        max_keepalive_connections=pool.max_keepalive_connections,
        keepalive_expiry=pool.keepalive_expiry_s,
    )
    transport: httpx.AsyncBaseTransport
    if upstream.transport == "aiohttp":
        transport = AiohttpTransport(limits)
    else:
        transport = FramingGuard(httpx.AsyncHTTPTransport(limits=limits, trust_env=False))
    return UpstreamClient(
        timeout=httpx.Timeout(
            connect=timeouts.connect_s,
            read=timeouts.total_s,
            write=timeouts.total_s,
            pool=config.concurrency_for(upstream).max_wait_s,
        ),
        transport=transport,
        follow_redirects=False,
        trust_env=False,
    )


def build_upstreams(
    config: Config, *, routes: RouteTable, env: Mapping[str, str] | None = None, on_load: LoadObserver | None = None
) -> tuple[Upstream, ...]:
    """One :class:`Upstream` per entry of ``upstreams`` (or the single ``upstream``), in config order."""
    env = os.environ if env is None else env
    limits = config.limits
    built = []
    for upstream in config.upstream_list():
        api_key = upstream.resolved_api_key(env)
        client = make_upstream_client(config, upstream)
        proxy = Proxy(
            client=client,
            upstream_url=upstream.url,
            routes=routes,
            api_key=api_key,
            forward_client_auth=upstream.forward_client_auth,
            assemble_non_streaming=config.routes.assemble_non_streaming,
            normalise_errors=config.routes.normalise_errors,
            body_limit_bytes=limits.body_bytes,
            assembled_limit_bytes=limits.assembled_bytes,
            frame_limit_bytes=limits.frame_bytes,
        )
        models = ModelService(
            config.models_for(upstream), client=client, upstream_url=upstream.url, api_key=api_key, on_load=on_load
        )
        proxy.model_info = models.model_info  # /api/v0 answers lmgate assembles
        built.append(Upstream(name=upstream.name, config=upstream, client=client, api_key=api_key, models=models, proxy=proxy))
    return tuple(built)
