"""The simulator's ASGI app: LM Studio's HTTP routes, answered the way LM Studio answers them.

A plain dispatcher, not a framework router, because LM Studio's quirks are part of what is being
simulated: an unknown route or method is **HTTP 200** with ``{"error": "Unexpected endpoint or
method. (METHOD /path)"}``; auth is checked only on known routes (and never on the
``/lmstudio-greeting`` probe); the private ``/__sim/`` control API exists only when enabled, and
otherwise is just another unknown route. ``websocket`` scopes are LM Studio's SDK protocol
(:mod:`gateway.simulator.sdk`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from gateway.simulator import catalog, errors
from gateway.simulator.context import SimContext
from gateway.simulator.embeddings import serve_embeddings
from gateway.simulator.errors import SimError
from gateway.simulator.faults import EARLY_FAULTS, REQUEST_FAULTS, Fault
from gateway.simulator.formats import DIALECTS, Dialect
from gateway.simulator.generation import Generation, apply_early_fault
from gateway.simulator.http import EXPRESS_HEADERS, Exchange, run_watched
from gateway.simulator.sdk import sdk_server
from middleware.types import Receive, Scope, Send

Handler = Callable[[SimContext, Exchange, dict[str, Any]], Awaitable[None]]
ControlHandler = Callable[[Exchange, bytes], Awaitable[None]]

CONTROL_PREFIX = "/__sim/"
#: What Express's cors() middleware answers to a preflight OPTIONS request.
PREFLIGHT_HEADERS = (
    *EXPRESS_HEADERS,
    (b"access-control-allow-methods", b"GET,HEAD,PUT,PATCH,POST,DELETE"),
    (b"content-length", b"0"),
)


@dataclass(frozen=True)
class Route:
    handler: Handler
    authenticated: bool = True
    inference: bool = False  # counted in Counters.requests (chat, completions, responses, messages, embeddings)


def _inference(dialect_class: type[Dialect]) -> Handler:
    async def handle(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
        dialect = dialect_class()
        model = body.get("model") if isinstance(body.get("model"), str) else None
        fault = _take_fault(ctx, model)
        if await apply_early_fault(fault, exchange, dialect):
            return
        try:
            request = dialect.parse(body)
        except SimError as error:
            await exchange.respond(error.status, dialect.error_body(error), error.headers)
            return
        await Generation(ctx, exchange, dialect, request, body, fault).run()

    return handle


def _take_fault(ctx: SimContext, model: str | None, kinds: Collection[str] = REQUEST_FAULTS.keys()) -> Fault | None:
    fault = ctx.faults.take_request_fault(model, kinds)
    if fault is not None:
        ctx.counters.faults_applied += 1
    return fault


async def _embeddings(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
    model = body.get("model") if isinstance(body.get("model"), str) else None
    await serve_embeddings(ctx, exchange, body, _take_fault(ctx, model, EARLY_FAULTS))


async def _greeting(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
    await exchange.respond(200, {"lmstudio": True})


async def _openai_models(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
    await exchange.respond(200, catalog.openai_models(ctx.manager))


async def _v0_models(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
    await exchange.respond(200, catalog.v0_models(ctx.manager))


async def _v0_model(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
    name = exchange.path.removeprefix("/api/v0/models/")
    model = ctx.manager.models.get(name)
    if model is None:
        await exchange.respond_error(errors.no_such_model(name))
        return
    await exchange.respond(200, catalog.v0_model(ctx.manager, model))


async def _v1_models(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
    await exchange.respond(200, catalog.v1_models(ctx.manager))


def required_string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise errors.missing_parameter(key)
    return value


def optional_positive(body: dict[str, Any], key: str, *, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise errors.invalid_parameter(key, "a positive integer" if integer else "a positive number")
    return value


async def _rest_load(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
    """``POST /api/v1/models/load``: blocks for the load delay. ``ttl`` (seconds) is accepted as an
    extension (undocumented by LM Studio); without it the instance never expires, as with ``lms load``."""
    try:
        name = required_string(body, "model")
        context_length = optional_positive(body, "context_length", integer=True)
        ttl_s = optional_positive(body, "ttl")
        instance, seconds = await ctx.manager.load(name, ttl_s=ttl_s, context_length=context_length)
    except SimError as error:
        await exchange.respond_error(error)
        return
    answer: dict[str, Any] = {
        "type": "embedding" if instance.model.is_embedding else "llm",
        "instance_id": instance.identifier,
        "load_time_seconds": round(seconds, 3),
        "status": "loaded",
    }
    if body.get("echo_load_config") is True:
        answer["load_config"] = {
            "context_length": instance.context_length,
            "eval_batch_size": 512,
            "flash_attention": True,
            "offload_kv_cache_to_gpu": True,
        }
    await exchange.respond(200, answer)


async def _rest_unload(ctx: SimContext, exchange: Exchange, body: dict[str, Any]) -> None:
    try:
        name = required_string(body, "instance_id")
        if not any(i.identifier == name for i in ctx.manager.instances):
            raise errors.no_such_instance(name)
    except SimError as error:
        await exchange.respond_error(error)
        return
    ctx.manager.unload_named(name)
    await exchange.respond(200, {"instance_id": name})


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/lmstudio-greeting"): Route(_greeting, authenticated=False),
    ("GET", "/v1/models"): Route(_openai_models),
    ("GET", "/api/v0/models"): Route(_v0_models),
    ("GET", "/api/v1/models"): Route(_v1_models),
    ("POST", "/api/v1/models/load"): Route(_rest_load),
    ("POST", "/api/v1/models/unload"): Route(_rest_unload),
    ("POST", "/v1/embeddings"): Route(_embeddings, inference=True),
    ("POST", "/api/v0/embeddings"): Route(_embeddings, inference=True),
    **{("POST", route): Route(_inference(dialect), inference=True) for route, dialect in DIALECTS.items()},
}


def find_route(method: str, path: str) -> Route | None:
    route = ROUTES.get((method, path))
    if route is None and method == "GET" and path.startswith("/api/v0/models/"):
        route = Route(_v0_model)
    return route


def check_auth(ctx: SimContext, exchange: Exchange) -> SimError | None:
    """LM Studio 0.4 "Require Authentication": a bearer token (``x-api-key`` too on ``/v1/messages``)."""
    token = ctx.settings.api_token
    if token is None:
        return None
    header = exchange.header(b"authorization") or ""
    scheme, _, value = header.partition(" ")
    provided = value.strip() if scheme.lower() == "bearer" else None
    if provided is None and exchange.path == "/v1/messages":
        provided = exchange.header(b"x-api-key")
    if provided == token:
        return None
    return errors.invalid_api_key(provided=bool(provided))


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"Invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise errors.bad_request("The request body must be a JSON object")
    return body


class SimulatorApp:
    """The ASGI app. ``control`` handles ``/__sim/...`` when the control API is enabled."""

    def __init__(self, ctx: SimContext, *, control: ControlHandler | None = None) -> None:
        self.ctx = ctx
        self.control = control
        self.sdk = sdk_server(ctx)  # LM Studio's SDK protocol, on websockets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            with self.ctx.runtime.request():  # stopping the simulator ends open sockets too
                await self.sdk(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        exchange = Exchange(scope, receive, send, clock=self.ctx.clock, counters=self.ctx.counters)
        with self.ctx.runtime.request():
            # The body is read whole before the disconnect watcher starts: two readers of
            # receive() would race for the body messages, and one taken by the watcher is lost.
            raw = await exchange.read_body()
            await run_watched(exchange, lambda: self._dispatch(exchange, raw))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with self.ctx.runtime.run():
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
        await send({"type": "lifespan.shutdown.complete"})

    def _count(self, exchange: Exchange) -> Route | None:
        counters = self.ctx.counters
        route = find_route(exchange.method, exchange.path)
        key = f"{exchange.method} {exchange.path}"
        counters.routes = {**counters.routes, key: counters.routes.get(key, 0) + 1}
        counters.http_requests += 1
        if route is not None and route.inference:
            counters.requests += 1
        return route

    async def _dispatch(self, exchange: Exchange, raw: bytes) -> None:
        if self.control is not None and exchange.path.startswith(CONTROL_PREFIX):
            await self.control(exchange, raw)
            return
        route = self._count(exchange)
        if exchange.method == "OPTIONS":
            await exchange.start(204, PREFLIGHT_HEADERS)
            await exchange.finish()
            return
        try:
            if route is None:
                raise errors.unexpected_endpoint(exchange.method, exchange.path)
            if route.authenticated and (denied := check_auth(self.ctx, exchange)) is not None:
                raise denied
            body = parse_body(raw)
        except SimError as error:
            await exchange.respond_error(error)
            return
        await route.handler(self.ctx, exchange, body)
