"""``SharedState``: one Redis client per gateway, every call bounded, and whether Redis answers now.

Everything lmgate shares between replicas goes through :meth:`SharedState.run` (a command) or a
:class:`SharedScript` (a Lua script, atomic on the server). Each call is bounded by
``state.timeout_ms``, on top of the client's own socket timeouts and with its retries off (redis-py
retries a failed call 10 times with backoff by default, seconds a request must not wait): a slow
Redis costs a request milliseconds, never seconds.

The first failure marks Redis unavailable: :class:`StateUnavailable` is raised at once from then
on, without a call, and every shared decision falls back to a local one. A background probe
(:meth:`running`) pings Redis every second and marks it available again when it answers. Each
transition is logged once (``state_unavailable`` / ``state_available``) and counted.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import anyio
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.config.settings import StateConfig
from middleware.slots import SlotsUnavailable
from middleware.types import Clock

__all__ = ["SharedScript", "SharedState", "StateUnavailable"]

logger = logging.getLogger("lmgate.state")

_T = TypeVar("_T")
#: How often Redis is pinged: while unavailable to notice its return, while available to notice
#: its loss before a request pays a timeout for it.
PROBE_INTERVAL_S = 1.0
#: A probe may take longer than a request's call: it may open a fresh connection (TLS, AUTH).
PROBE_TIMEOUT_S = 1.0
#: Connections to Redis at most; a call past them fails (and falls back) instead of queueing.
MAX_CONNECTIONS = 256


class StateUnavailable(SlotsUnavailable):
    """Redis did not answer in time, or is known not to: decide locally."""


class SharedScript:
    """A Lua script run atomically on Redis (``EVALSHA``, loaded again after a Redis restart)."""

    def __init__(self, state: SharedState, source: str) -> None:
        self.state = state
        self._script: AsyncScript = state.redis.register_script(source)

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        """Run the script, bounded like any call (StateUnavailable when Redis fails)."""
        return await self.state.run(lambda redis: self._script(keys=list(keys), args=list(args), client=redis))

    async def queue(self, pipeline: Pipeline, keys: Sequence[str], args: Sequence[str | int | float]) -> None:
        """Queue the script on ``pipeline`` (inside a :meth:`SharedState.run` call): many runs, one round trip."""
        await self._script(keys=list(keys), args=list(args), client=pipeline)


class SharedState:
    """Redis as every replica sees it, or StateUnavailable; see the module docstring.

    For other shared decisions:

    * :meth:`key` names a key under ``state.key_prefix``;
    * :meth:`run` runs one bounded call (``await state.run(lambda r: r.set(key, value, px=ttl_ms))``);
    * :meth:`script` makes a Lua script for atomic read-modify-write (leases, queues, locks);
    * :meth:`on_heartbeat` registers a coroutine run every ``lease_s / 3`` (lease renewals);
    * :meth:`on_change` registers a callback for availability transitions;
    * :attr:`owner` identifies this process in what it writes (lease holders, lock owners).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        lease_s: float,
        key_prefix: str = "lmgate",
        probe_interval_s: float = PROBE_INTERVAL_S,
        clock: Clock = time.monotonic,
    ) -> None:
        self.redis: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=max(timeout_s, PROBE_TIMEOUT_S),
            retry=Retry(NoBackoff(), 0),  # no retries: a failure falls back at once, the probe finds the return
            max_connections=MAX_CONNECTIONS,
        )
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.prefix = key_prefix
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self.owner = os.urandom(6).hex()  # unique per process, in every lease token it writes
        self.available = True  # until a call fails; running() checks at once
        self.since = clock()
        self.last_error: str | None = None
        self.unavailable_total = 0
        self._heartbeats: list[Callable[[], Awaitable[None]]] = []
        self._listeners: list[Callable[[bool], None]] = []

    @classmethod
    def from_config(cls, config: StateConfig) -> SharedState | None:
        """The shared state ``config`` asks for; None without ``redis_url`` (each replica alone)."""
        if config.redis_url is None:
            return None
        return cls(
            config.redis_url, timeout_s=config.timeout_ms / 1000, lease_s=config.lease_s, key_prefix=config.key_prefix
        )

    @property
    def lease_ms(self) -> int:
        """``lease_s`` in whole milliseconds (at least 1), as the Lua scripts take leases."""
        return max(1, math.ceil(self.lease_s * 1000))

    def key(self, *parts: str) -> str:
        """A Redis key under the prefix: ``key("slots", "default")`` -> ``lmgate:slots:default``."""
        return ":".join((self.prefix, *parts))

    def script(self, source: str) -> SharedScript:
        return SharedScript(self, source)

    def on_heartbeat(self, beat: Callable[[], Awaitable[None]]) -> None:
        """Run ``beat()`` every ``lease_s / 3`` while available (it may raise StateUnavailable)."""
        self._heartbeats.append(beat)

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(available)`` on each transition."""
        self._listeners.append(listener)

    async def run(self, call: Callable[[Redis], Awaitable[_T]], *, timeout_s: float | None = None) -> _T:
        """``await call(redis)`` within the deadline; StateUnavailable if Redis is down or fails now."""
        if not self.available:
            raise StateUnavailable(f"shared state unavailable: {self.last_error}")
        try:
            with anyio.fail_after(timeout_s or self.timeout_s):
                return await call(self.redis)
        except (RedisError, OSError, TimeoutError) as exc:
            self._mark_unavailable(exc)
            raise StateUnavailable(f"shared state unavailable: {self.last_error}") from exc

    def snapshot(self) -> dict[str, Any]:
        """For readiness and the status page: available, for how long, and the last error."""
        return {
            "available": self.available,
            "for_s": round(self.clock() - self.since, 1),
            "last_error": self.last_error,
        }

    def collector(self) -> SharedStateCollector:
        return SharedStateCollector(self)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Probe Redis and run the heartbeats for the block; close the connections after it."""
        await self._probe(initial=True)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._probe_loop)
                tg.start_soon(self._heartbeat_loop)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(PROBE_TIMEOUT_S):
                await self.redis.aclose()

    async def _probe_loop(self) -> None:
        while True:
            await anyio.sleep(self.probe_interval_s)
            await self._probe()

    async def _probe(self, *, initial: bool = False) -> None:
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            if initial or self.available:
                self.available = True  # so the first failure at start-up is logged too
                self._mark_unavailable(exc)
            else:
                self.last_error = _describe(exc)
            return
        if not self.available:
            self._mark_available()
        elif initial:
            logger.info("shared state on Redis", extra={"event": "state_available"})

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.lease_s / 3)
            for beat in self._heartbeats:
                if self.available:
                    with suppress(StateUnavailable):  # logged once by the transition; leases expire
                        await beat()

    def _mark_unavailable(self, exc: BaseException) -> None:
        self.last_error = _describe(exc)
        if not self.available:
            return
        self.available = False
        self.since = self.clock()
        self.unavailable_total += 1
        logger.warning(
            "shared state unavailable (%s): each replica decides alone, with local limits, until Redis answers",
            self.last_error,
            extra={"event": "state_unavailable", "error": self.last_error},
        )
        self._notify(False)

    def _mark_available(self) -> None:
        self.available = True
        down_s = self.clock() - self.since
        self.since = self.clock()
        logger.info(
            "shared state available again after %.1f s: decisions are shared",
            down_s,
            extra={"event": "state_available", "unavailable_s": round(down_s, 1)},
        )
        self._notify(True)

    def _notify(self, available: bool) -> None:
        for listener in self._listeners:
            listener(available)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class SharedStateCollector:
    """``lmgate.shared_state.available`` (1/0) and the transitions to unavailable, at scrape time."""

    def __init__(self, state: SharedState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "lmgate.shared_state.available",
            "1 while Redis answers and decisions are shared; 0 while each replica decides alone.",
            value=1.0 if self.state.available else 0.0,
        )
        yield CounterMetricFamily(
            "lmgate.shared_state.unavailable",
            "Times Redis became unavailable (each followed by local decisions until it answered).",
            value=self.state.unavailable_total,
        )
