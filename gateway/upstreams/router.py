"""``Router``: send each request to the upstream where its model is warm, and fail over.

With several upstreams the shared layers (errors ... heartbeat) end here, and each upstream has
its own layers below (cold start, concurrency, timeout, retry, circuit breaker, proxy: built by
``gateway.stack``). For a request naming a model (the JSON body's ``model``, an unload's ``instance_id``, or the id
in ``GET /v1/models/{id}``) the router

1. reads every upstream's model state (each upstream's registry, refreshed when older than
   ``models.refresh_s``; an upstream slower than ``refresh_wait_s`` to answer is judged by what
   it said last, so one stalled upstream never holds up requests for the others);
2. keeps the upstreams that list the model, answered their last refresh, and are allowed by
   ``models.pin``; none: ``404 model_not_found`` naming the upstreams asked, or ``503`` when some
   did not answer (the model may be on one of them);
3. orders them by the routing rules (:func:`gateway.upstreams.choice.rank`), open circuits last;
4. hands the request to the first one's layers. Before the first byte reaches the client, a
   connect error or reset, a timeout of the upstream, a 502/503/504 (``retry.retry_statuses``),
   an open circuit, a full queue or a failed load there moves it to the next one at once (the
   upstream's own retry layer makes one attempt while another upstream is left to try:
   ``middleware.retry.FAILOVER_KEY``; the last one retries as usual). After the first byte
   nothing is retried.

An upstream a request could not reach is considered down (its models unloaded there) until its
model state is read successfully again; then its open circuits let a probe through at once
(rather than after ``circuit_breaker.reset_timeout_s``). Loads are single flight across
upstreams: a request for a model loaded nowhere joins a load under way anywhere (the upstream's
own loader, or a request the router has just sent there to load it) rather than start another.
A load on another upstream while one that answers still has the model loaded (rule 2's spill,
or a failover from a 502/503/504) is logged as a second instance (``model_second_instance``).

Requests naming no model (tokenize routes without a body model, for instance) go to the least busy
upstream that answers; the model lists are merged (:mod:`gateway.upstreams.lists`). Every answer
carries ``X-Lmgate-Upstream``; :func:`chosen_upstream` tells telemetry which upstream served.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import unquote

import anyio
from anyio.abc import TaskGroup

from gateway.models.errors import ModelLoadFailed
from gateway.models.registry import ModelRecord, ModelRegistry
from gateway.request.routes import route_path
from gateway.upstreams.choice import Candidate, Reason, rank
from gateway.upstreams.errors import ModelNotFound, NoUpstreamAnswered
from gateway.upstreams.lists import MODEL_LISTS, ModelLists
from gateway.upstreams.upstream import Upstream
from middleware._adaptive import Ewma
from middleware.body import DEFAULT_LIMIT_BYTES, model_of, read_body, replaying_receive, request_json
from middleware.circuit_breaker import CircuitBreakerMiddleware
from middleware.concurrency import ConcurrencyMiddleware, Pressure
from middleware.errors import CircuitOpen, LmgateError, Overloaded, UpstreamUnavailable
from middleware.request_id import request_id
from middleware.retry import FAILOVER_KEY, run_attempt
from middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["UPSTREAM_HEADER", "Route", "Router", "chosen_upstream", "upstream_headers"]

logger = logging.getLogger("lmgate.routing")

UPSTREAM_HEADER = b"x-lmgate-upstream"
_UPSTREAM_KEY = "lmgate.upstream"
#: ``GET`` routes whose last path segments name a model.
_MODEL_ROUTES = ("/v1/models/", "/api/v0/models/", "/api/v1/models/")


def chosen_upstream(scope: Scope) -> str | None:
    """The name of the upstream the router sent this request to (the last one, after failover)."""
    return (scope.get("state") or {}).get(_UPSTREAM_KEY)


def upstream_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """``X-Lmgate-Upstream`` for a response an outer layer starts early (the heartbeat layer)."""
    name = chosen_upstream(scope)
    return [(UPSTREAM_HEADER, name.encode("ascii"))] if name is not None else []


@dataclass(frozen=True)
class Route:
    """One upstream and the layers in front of its proxy."""

    upstream: Upstream
    app: ASGIApp  # the upstream's own layers around its proxy
    concurrency: ConcurrencyMiddleware | None
    breaker: CircuitBreakerMiddleware | None

    @property
    def name(self) -> str:
        return self.upstream.name

    @property
    def registry(self) -> ModelRegistry:
        return self.upstream.models.registry


@dataclass
class RouterStats:
    """Counters since start-up: choices by rule, failovers, second instances (read-only)."""

    chosen: Counter[str]
    failovers: int = 0
    second_instances: int = 0


class Router:
    """Choose an upstream per request and fail over before the first byte; see the module docstring."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        pins: Mapping[str, Collection[str]] | None = None,
        failover_statuses: Collection[int] = (502, 503, 504),
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        list_timeout_s: float = 5.0,
        refresh_wait_s: float = 1.0,
    ) -> None:
        if not routes:
            raise ValueError("a router needs at least one upstream")
        self.routes = list(routes)
        self.by_name = {route.name: route for route in self.routes}
        self.pins = {model: frozenset(names) for model, names in (pins or {}).items()}
        self.failover_statuses = frozenset(failover_statuses)
        self.body_limit_bytes = body_limit_bytes
        self.refresh_wait_s = refresh_wait_s
        self.lists = ModelLists([route.upstream for route in self.routes], timeout_s=list_timeout_s)
        self.stats = RouterStats(chosen=Counter())
        self._placing: dict[str, Counter[str]] = {}  # model -> upstream -> requests sent there to load it
        self._down: dict[str, float] = {}  # upstream -> registry time a request could not reach it
        self._in_flight: Counter[str] = Counter()
        self._ttfb = {route.name: Ewma(0.2) for route in self.routes}
        self._refreshes: dict[str, anyio.Event] = {}
        self._tasks: TaskGroup | None = None

    # -- lifespan ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Own the background model-state refreshes for the block (the gateway's lifespan)."""
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            try:
                yield
            finally:
                self._tasks = None
                tg.cancel_scope.cancel()

    # -- the request path -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.routes[0].app(scope, receive, send)
            return
        path = route_path(scope)
        method = scope.get("method", "GET")
        if method in ("GET", "HEAD") and path in MODEL_LISTS and await self.lists.serve(path, send, head=method == "HEAD"):
            return  # merged; when no upstream answered, the request goes on to one of them
        model = await self._model(scope, receive, path)
        await read_body(scope, receive, limit_bytes=self.body_limit_bytes)  # kept: each attempt gets it replayed
        choices = await self.choose(model)
        await self._dispatch(choices, model, scope, receive, send)

    async def _model(self, scope: Scope, receive: Receive, path: str) -> str | None:
        if scope.get("method") in ("GET", "HEAD"):
            for prefix in _MODEL_ROUTES:
                if path.startswith(prefix) and len(path) > len(prefix):
                    return unquote(path[len(prefix) :])
            return None
        model = await model_of(scope, receive, limit_bytes=self.body_limit_bytes)
        if model is None:
            # LM Studio's unload names an instance ("key:2"); the registries know whose it is.
            instance = (request_json(scope) or {}).get("instance_id")
            model = instance if isinstance(instance, str) and instance else None
        return model

    async def choose(self, model: str | None) -> list[tuple[Route, Reason | None]]:
        """The upstreams to try for ``model``, best first (see the module docstring)."""
        if model is None:
            await self._refresh(self.routes)
            up = [route for route in self.routes if self._reachable(route)] or self.routes
            return [(route, None) for route in sorted(up, key=lambda r: (self._pressure(r, None).busy, self._index(r)))]
        allowed = [route for route in self.routes if route.name in self.pins.get(model, self.by_name)]
        await self._refresh(allowed)
        candidates: list[Candidate] = []
        unanswered: list[str] = []
        for route in allowed:
            if not self._reachable(route):
                unanswered.append(route.name)
                continue
            record = route.registry.find(model)
            if record is not None and record.listed is not None:
                candidates.append(self._candidate(route, model, record))
        if not candidates:
            asked = ", ".join(route.name for route in allowed)
            if unanswered:
                why = "; ".join(f"{name}: {self.by_name[name].registry.refresh_error or 'down'}" for name in unanswered)
                raise NoUpstreamAnswered(
                    f'No upstream that answered lists the model "{model}" (asked: {asked}); '
                    f"{', '.join(unanswered)} did not answer, so it may be there ({why}). Try again shortly.",
                    retry_after_s=self.routes[0].registry.refresh_s,
                )
            raise ModelNotFound(f'The model "{model}" is not available on any upstream (asked: {asked}).')
        ranked = rank(candidates)
        # An open circuit sheds requests anyway: try it last (it lets a probe through once cooled down).
        ranked.sort(key=lambda choice: self._circuit_open(self.by_name[choice.name], model))
        return [(self.by_name[choice.name], choice.reason) for choice in ranked]

    async def first_choice(self, model: str) -> str:
        """The name of the upstream a request for ``model`` would be sent to first."""
        return (await self.choose(model))[0][0].name

    def _candidate(self, route: Route, model: str, record: ModelRecord) -> Candidate:
        registry, loader = route.registry, route.upstream.models.loader
        state = registry.state(model)
        job = loader.jobs.get(record.id)
        load_s: float | None
        if state == "loading" or job is not None or self._placing.get(record.id, Counter())[route.name]:
            kind = "loading"
            began = job.began_at or job.asked_at if job is not None else None
            expected = self._expected_load_s(route, model)
            load_s = None if expected is None else max(0.0, expected - (anyio.current_time() - began if began else 0.0))
        elif state in ("loaded", "unknown"):  # "unknown": listed by a server that does not say (always loaded)
            kind, load_s = "loaded", None
        else:
            kind, load_s = "not-loaded", self._expected_load_s(route, model)
        pressure = self._pressure(route, model)
        return Candidate(
            name=route.name,
            index=self._index(route),
            state=kind,  # type: ignore[arg-type]
            free=pressure.free,
            busy=pressure.busy,
            wait_s=pressure.wait_s,
            load_s=load_s,
            loaded_models=sum(1 for r in registry.records.values() if r.state == "loaded"),
            ttft_s=self._ttfb[route.name].value,
        )

    def _expected_load_s(self, route: Route, model: str) -> float | None:
        """The model's load time measured there; else on another upstream (the same file)."""
        expected = route.registry.expected_load_s(model)
        if expected is None:
            expected = next((s for r in self.routes if (s := r.registry.expected_load_s(model)) is not None), None)
        return expected

    def _pressure(self, route: Route, model: str | None) -> Pressure:
        if route.concurrency is not None:
            return route.concurrency.pressure(model)
        in_flight = self._in_flight[route.name]
        return Pressure(limit=max(in_flight, 1) * 1_000, in_flight=in_flight, queued=0, wait_s=0.0)  # no limit

    def _circuit_open(self, route: Route, model: str) -> bool:
        return route.breaker is not None and route.breaker.state_of(model) == "open"

    def _index(self, route: Route) -> int:
        return self.routes.index(route)

    def reachable(self, name: str) -> bool:
        """Whether the upstream called ``name`` is taking requests (see :meth:`_reachable`)."""
        return self._reachable(self.by_name[name])

    def _reachable(self, route: Route) -> bool:
        """The upstream answered its latest model-state refresh, and no request failed to reach it since."""
        registry = route.registry
        if registry.refresh_error is not None or registry.refreshed_at is None:
            return False
        down_at = self._down.get(route.name)
        if down_at is not None:
            if registry.refreshed_at <= down_at:
                return False
            del self._down[route.name]
            logger.info("upstream %s answers again", route.name, extra={"event": "upstream_up", "upstream": route.name})
            if route.breaker is not None:
                # Its circuits opened while it was down; waiting out their cool-down would keep a
                # server that answers out of rotation (a model only it has: 503 meanwhile). Probe it now.
                route.breaker.probe_now()
        return True

    async def _refresh(self, routes: Sequence[Route]) -> None:
        """Refresh the stale registries; wait at most ``refresh_wait_s`` for them."""
        stale = [route for route in routes if not route.registry.fresh]
        if not stale:
            return
        with anyio.move_on_after(self.refresh_wait_s):
            if self._tasks is None:  # not running under a lifespan: refresh here, within the bound
                async with anyio.create_task_group() as tg:
                    for route in stale:
                        tg.start_soon(route.registry.refresh)
                return
            for event in [self._refresh_in_background(route, self._tasks) for route in stale]:
                await event.wait()

    def _refresh_in_background(self, route: Route, tasks: TaskGroup) -> anyio.Event:
        event = self._refreshes.get(route.name)
        if event is None:
            event = self._refreshes[route.name] = anyio.Event()

            async def refresh() -> None:
                try:
                    await route.registry.refresh()
                finally:
                    del self._refreshes[route.name]
                    event.set()

            tasks.start_soon(refresh)
        return event

    async def _dispatch(
        self, choices: list[tuple[Route, Reason | None]], model: str | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        state = scope.setdefault("state", {})
        for number, (route, reason) in enumerate(choices, start=1):
            final = number == len(choices)
            state[_UPSTREAM_KEY] = route.name
            state[FAILOVER_KEY] = not final  # the upstream's own retry layer leaves a failure to us
            self._note_choice(scope, route, reason, model, choices)
            placing = model is not None and reason in ("load", "spill", "join")
            if placing:
                self._placing.setdefault(model, Counter())[route.name] += 1  # type: ignore[arg-type]
            self._in_flight[route.name] += 1
            try:
                attempt = await run_attempt(
                    route.app,
                    scope,
                    replaying_receive(scope, receive),
                    self._timed(route, send),
                    number=number,
                    judge=None if final else self._judge,
                    start=_naming(route.name),
                )
            except LmgateError as error:
                error.extra_headers = (*error.extra_headers, (UPSTREAM_HEADER.decode(), route.name))
                raise
            finally:
                self._in_flight[route.name] -= 1
                if placing:
                    self._unplace(model, route.name)  # type: ignore[arg-type]
            if not attempt.retryable:
                return
            self._failed_over(scope, route, attempt.error, attempt.describe(), choices[number][0])

    def _timed(self, route: Route, send: Send) -> Send:
        """``send`` that feeds the upstream's time to first byte (a tie-break between equals)."""
        started = anyio.current_time()
        timed = False

        async def timed_send(message: Message) -> None:
            nonlocal timed
            if not timed and message["type"] == "http.response.body":
                timed = True
                self._ttfb[route.name].add(anyio.current_time() - started)
            await send(message)

        return timed_send

    def _judge(self, outcome: Message | LmgateError) -> tuple[bool, float | None]:
        """Whether an outcome before the first byte moves the request to the next upstream."""
        if isinstance(outcome, LmgateError):
            return outcome.retryable or isinstance(outcome, (CircuitOpen, Overloaded, ModelLoadFailed)), None
        return outcome["status"] in self.failover_statuses, None

    def _unplace(self, model: str, name: str) -> None:
        placing = self._placing[model]
        placing[name] -= 1
        if placing[name] <= 0:
            del placing[name]
        if not placing:
            del self._placing[model]

    def _note_choice(
        self, scope: Scope, route: Route, reason: Reason | None, model: str | None, choices: list[tuple[Route, Reason | None]]
    ) -> None:
        self.stats.chosen[reason or "any"] += 1
        if reason == "spill":
            busy = [r.name for r, why in choices if why == "queue"]
            why_here = f"the wait on {', '.join(busy) or 'the upstreams where it is loaded'} is longer than a load"
        elif reason == "load":
            # A failover that loads the model while an upstream that answers still has it loaded
            # (it answered 502/503/504, or its circuit is open): a second instance all the same.
            holding = [r.name for r, why in choices if why in ("warm", "queue") and r is not route and self._reachable(r)]
            if not holding:
                return
            why_here = f"failing over from {', '.join(holding)}, where it is loaded"
        else:
            return
        self.stats.second_instances += 1
        logger.warning(
            "loading a second instance of %s on %s: %s",
            model,
            route.name,
            why_here,
            extra={
                "event": "model_second_instance",
                "model": model,
                "upstream": route.name,
                "cause": reason,
                "request_id": request_id(scope),
            },
        )

    def _failed_over(self, scope: Scope, route: Route, error: LmgateError | None, outcome: str, to: Route) -> None:
        self.stats.failovers += 1
        if isinstance(error, UpstreamUnavailable):
            self._down[route.name] = route.registry.clock.now()  # its models count as unloaded until it answers
        logger.warning(
            "upstream %s failed before the first byte (%s); failing over to %s",
            route.name,
            outcome,
            to.name,
            extra={
                "event": "upstream_failover",
                "upstream": route.name,
                "to": to.name,
                "outcome": outcome,
                "request_id": request_id(scope),
            },
        )


def _naming(upstream: str) -> Callable[[Message], Message]:
    """A response start rewriter adding ``X-Lmgate-Upstream: upstream``."""
    header = (UPSTREAM_HEADER, upstream.encode("ascii"))

    def with_upstream(start: Message) -> Message:
        return {**start, "headers": [*start.get("headers", ()), header]}

    return with_upstream
