"""Admission control: at most ``limit`` requests in flight per key, then a bounded FIFO queue.

LM Studio runs a fixed number of predictions at once (4 by default) and queues the rest where
nobody can see or bound them. This layer keeps that queue in the gateway instead: a request past
the limit waits its turn in a FIFO of at most ``max_queue`` for at most ``max_wait_s``, and beyond
that it is refused at once with 503 ``overloaded`` (429 ``rate_limited`` when limits are per client
key) and a ``Retry-After`` estimated from how fast slots have been freeing up.

A slot is held until the inner app returns, that is until the last byte of a streamed body went
out or the request was cancelled, never just until the headers: a stream is load on the upstream
for as long as it runs. A queued request whose client leaves is dropped from the queue at once.

Each key (the whole upstream, or each ``model`` with ``per_model=True``, optionally split by
client key) has its own limiter. All limiter bookkeeping is synchronous, so between "a slot is
free" and "this waiter has it" nothing can interleave: a slot is handed over by ``release`` itself,
and a waiter that gives up after being handed one passes it straight on.

With ``shared`` (a :class:`~middleware.slots.SharedSlots`, e.g. Redis through gateway/state), the
slots and the FIFO queue are counted across every replica instead, and the local limiter stands by:
while the shared store cannot decide, each replica admits ``fallback_limit_share`` of the limit on
its own (at least one slot), counting the requests that still hold shared slots.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

import anyio

from middleware._adaptive import AimdLimit, Ewma
from middleware.body import model_of, read_body, replaying_receive
from middleware.disconnect import cancel_on_disconnect
from middleware.errors import (
    ClientDisconnected,
    LmgateError,
    Overloaded,
    RateLimited,
    error_layer_outside,
    raise_or_render,
)
from middleware.response import ResponseState
from middleware.slots import SharedPressure, SharedSlots, SlotLease, SlotsRefused, SlotsUnavailable
from middleware.types import ASGIApp, Clock, Message, Receive, Scope, Send

__all__ = ["ConcurrencyMiddleware", "Pressure"]

#: Snapshot name of the key used when limits are not split by model or client.
ALL = "*"
#: Idle per-key limiters beyond this many are forgotten, so arbitrary model names cannot grow memory.
_MAX_IDLE_KEYS = 256
_RETRY_AFTER_BOUNDS_S = (1.0, 60.0)

Key = tuple[str | None, str | None]  # (client key, model)


@dataclass(frozen=True)
class Pressure:
    """One limiter's load: ``in_flight`` of ``limit`` slots taken, ``queued`` waiting, and the
    expected wait for a slot in seconds (0 while one is free)."""

    limit: int
    in_flight: int
    queued: int
    wait_s: float

    @property
    def free(self) -> bool:
        return self.wait_s == 0 and self.in_flight < self.limit

    @property
    def busy(self) -> float:
        """Slots taken and queued over the limit: 0 idle, 1 full, above 1 queueing."""
        return (self.in_flight + self.queued) / max(self.limit, 1)


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class _Limiter:
    """One key's slots, FIFO queue and service-rate estimate. No method awaits."""

    __slots__ = ("fixed_limit", "adaptive", "in_flight", "waiters", "hold_s", "share", "shared_held")

    def __init__(self, limit: int, adaptive: AimdLimit | None, share: float = 1.0) -> None:
        self.fixed_limit = limit
        self.adaptive = adaptive
        self.in_flight = 0
        # With shared slots: the share of the limit admitted locally while the store is down, and
        # the requests of this replica holding shared slots (they count against that share).
        self.share = share
        self.shared_held = 0
        self.waiters: deque[_Waiter] = deque()
        # Average time a slot stays taken; with the limit it gives the service rate (Little's law).
        self.hold_s = Ewma(0.2)

    @property
    def limit(self) -> int:
        return self.adaptive.limit if self.adaptive is not None else self.fixed_limit

    @property
    def local_limit(self) -> int:
        """The slots admitted locally: the limit, or its fallback share (at least 1) with shared slots."""
        return self.limit if self.share >= 1 else max(1, int(self.limit * self.share))

    @property
    def busy_slots(self) -> int:
        return self.in_flight + self.shared_held

    @property
    def idle(self) -> bool:
        return self.busy_slots == 0 and not self.waiters

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued ahead (FIFO, no barging)."""
        if self.waiters or self.busy_slots >= self.local_limit:
            return False
        self.in_flight += 1
        return True

    def enqueue(self) -> _Waiter:
        waiter = _Waiter()
        self.waiters.append(waiter)
        return waiter

    def abandon(self, waiter: _Waiter) -> None:
        """The waiter gives up: leave the queue, or pass on the slot it was handed meanwhile."""
        if waiter.granted:
            self.release()
        else:
            self.waiters.remove(waiter)

    def release(self, held_s: float | None = None, *, shared: bool = False) -> None:
        if shared:
            self.shared_held -= 1
        else:
            self.in_flight -= 1
        if held_s is not None:
            self.hold_s.add(held_s)
        self._grant()

    def observe_latency(self, latency_s: float) -> None:
        if self.adaptive is not None:
            self.adaptive.observe(latency_s, self.busy_slots)
            self._grant()  # the limit may have grown

    def _grant(self) -> None:
        while self.waiters and self.busy_slots < self.local_limit:
            waiter = self.waiters.popleft()
            waiter.granted = True
            self.in_flight += 1
            waiter.event.set()

    def retry_after_s(self, default_s: float, *, bounded: bool = True, shared: SharedPressure | None = None) -> float:
        """Seconds until a newcomer would likely get a slot: everyone queued, plus itself, served
        at ``limit / average hold time`` per second (``bounded``: within 1-60 s, for Retry-After).
        With ``shared``, the queue and hold time of every replica."""
        hold_s, queued, limit = self.hold_s.value, len(self.waiters), self.local_limit
        if shared is not None:
            hold_s, queued, limit = shared.hold_s if shared.hold_s is not None else hold_s, shared.queued, self.limit
        if hold_s is None:
            return default_s
        estimate = (queued + 1) * hold_s / max(limit, 1)
        if not bounded:
            return estimate
        low, high = _RETRY_AFTER_BOUNDS_S
        return min(max(estimate, low), high)

    def snapshot(self) -> dict[str, int]:
        return {"limit": self.local_limit, "in_flight": self.busy_slots, "queued": len(self.waiters)}


class ConcurrencyMiddleware:
    """Limit requests in flight per upstream (or per model), queue a bounded few, shed the rest.

    Options:
        limit: requests in flight per key (LM Studio's default parallel predictions is 4).
        max_queue: requests that may wait per key; 0 sheds as soon as the limit is reached.
        max_wait_s: how long a queued request waits for a slot before it is shed.
        per_model: one limiter per ``model`` in the JSON body (the body is read and replayed).
        adaptive: let the limit follow latency between ``min_limit`` and ``max_limit``
            (AIMD on the average time to first body byte, see ``middleware._adaptive``).
        latency_threshold_s: the average time to first byte above which the adaptive limit falls.
        client_key: ``scope -> identifier`` for per-client limits; refusals are then 429. Return a
            key *name*, not a secret: it appears in ``snapshot()``.
        default_retry_after_s: ``Retry-After`` before any request has finished on that key.
        exempt_paths: paths never limited (health, metrics, model lists).
        shared: slots counted across replicas (``middleware.slots.SharedSlots``); None: this process alone.
        fallback_limit_share: with ``shared``, the share of each limit admitted locally while the
            shared store cannot decide (at least one slot).
        clock: monotonic seconds; injected in tests.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int = 4,
        max_queue: int = 16,
        max_wait_s: float = 30.0,
        per_model: bool = False,
        adaptive: bool = False,
        min_limit: int = 1,
        max_limit: int = 16,
        latency_threshold_s: float = 10.0,
        client_key: Callable[[Scope], str | None] | None = None,
        default_retry_after_s: float = 5.0,
        exempt_paths: Collection[str] = (),
        shared: SharedSlots | None = None,
        fallback_limit_share: float = 0.5,
        clock: Clock = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        if max_queue < 0:
            raise ValueError(f"max_queue must not be negative, not {max_queue!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must not be negative, not {max_wait_s!r}")
        if not default_retry_after_s > 0:
            raise ValueError(f"default_retry_after_s must be positive, not {default_retry_after_s!r}")
        if not 0 < fallback_limit_share <= 1:
            raise ValueError(f"fallback_limit_share must be above 0 and at most 1, not {fallback_limit_share!r}")
        if adaptive:
            if not min_limit <= limit <= max_limit:
                raise ValueError(f"adaptive needs min_limit <= limit <= max_limit, got {min_limit}, {limit}, {max_limit}")
            # Validates the remaining adaptive options once, at start-up.
            AimdLimit(initial=limit, min_limit=min_limit, max_limit=max_limit, latency_threshold_s=latency_threshold_s)
        self.app = app
        self.limit = limit
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.per_model = per_model
        self.adaptive = adaptive
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.latency_threshold_s = latency_threshold_s
        self.client_key = client_key
        self.default_retry_after_s = default_retry_after_s
        self.exempt_paths = frozenset(exempt_paths)
        self.shared = shared
        self.fallback_limit_share = fallback_limit_share
        self.clock = clock
        self._limiters: dict[Key, _Limiter] = {}
        if not per_model and client_key is None:
            self._limiter((None, None))  # so snapshot() shows the one key before any traffic

    def pressure(self, model: str | None = None) -> Pressure:
        """How busy the limiter a request for ``model`` would join is, without joining it.

        For routers choosing between several upstreams (gateway/upstreams/router.py): slots in
        use and queued, and the expected wait for a slot (0 while one is free).
        """
        key: Key = (None, model if self.per_model else None)
        limiter = self._limiters.get(key)
        if limiter is None:
            return Pressure(limit=self.limit, in_flight=0, queued=0, wait_s=0.0)
        shared = self._shared_pressure(key)
        if shared is not None:
            free = shared.queued == 0 and shared.in_flight < limiter.limit
            wait_s = 0.0 if free else limiter.retry_after_s(self.default_retry_after_s, bounded=False, shared=shared)
            return Pressure(limit=limiter.limit, in_flight=shared.in_flight, queued=shared.queued, wait_s=wait_s)
        free = not limiter.waiters and limiter.busy_slots < limiter.local_limit
        wait_s = 0.0 if free else limiter.retry_after_s(self.default_retry_after_s, bounded=False)
        return Pressure(limit=limiter.local_limit, in_flight=limiter.busy_slots, queued=len(limiter.waiters), wait_s=wait_s)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per key: ``limit``, ``in_flight`` and ``queued``, for metrics, health and the status page
        (with shared slots: across every replica, as last seen, while the shared store answers)."""
        out = {}
        for key, limiter in self._limiters.items():
            shared = self._shared_pressure(key)
            out[_key_name(key)] = limiter.snapshot() if shared is None else {
                "limit": limiter.limit, "in_flight": shared.in_flight, "queued": shared.queued
            }
        return out

    def _shared_pressure(self, key: Key) -> SharedPressure | None:
        """The key's slots across replicas while they are shared (None: decided locally now)."""
        if self.shared is None or not self.shared.available:
            return None
        return self.shared.pressure(_key_name(key))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        outside = error_layer_outside(scope)
        lease: SlotLease | None = None
        try:
            key = await self._key(scope, receive)
            limiter = self._limiter(key)
            started = self.clock()
            if self.shared is not None and self.shared.available:
                lease = await self._admit_shared(key, limiter, scope, receive)
            if lease is None:  # no shared store, or it cannot decide now: this replica alone
                await self._admit(limiter, scope, receive, max_wait_s=self.max_wait_s - (self.clock() - started))
        except ClientDisconnected:
            return
        except LmgateError as error:
            # Nothing has been sent: raised to the error layer, or rendered here when used alone.
            await raise_or_render(error, send, ResponseState(), outside=outside)
            return
        await self._serve(limiter, lease, scope, replaying_receive(scope, receive), send)

    async def _key(self, scope: Scope, receive: Receive) -> Key:
        client = self.client_key(scope) if self.client_key is not None else None
        model = await model_of(scope, receive) if self.per_model else None
        return client, model

    def _limiter(self, key: Key) -> _Limiter:
        limiter = self._limiters.get(key)
        if limiter is None:
            if len(self._limiters) >= _MAX_IDLE_KEYS:
                for stale in [k for k, lim in self._limiters.items() if lim.idle]:
                    del self._limiters[stale]
            adaptive = None
            if self.adaptive:
                adaptive = AimdLimit(
                    initial=self.limit,
                    min_limit=self.min_limit,
                    max_limit=self.max_limit,
                    latency_threshold_s=self.latency_threshold_s,
                )
            share = self.fallback_limit_share if self.shared is not None else 1.0
            limiter = self._limiters[key] = _Limiter(self.limit, adaptive, share)
        return limiter

    async def _admit_shared(self, key: Key, limiter: _Limiter, scope: Scope, receive: Receive) -> SlotLease | None:
        """Return holding a shared slot, None when the shared store cannot decide (then decide
        locally), or raise ``Overloaded``/``RateLimited``/``ClientDisconnected``."""
        assert self.shared is not None
        name = _key_name(key)
        try:  # a free slot nobody waits for: one round trip, no watch (max_queue=0: never queued)
            return self._holding(limiter, await self.shared.acquire(name, limit=limiter.limit, max_queue=0))
        except SlotsUnavailable:
            return None
        except SlotsRefused:
            pass  # busy: queue, watching the client
        # With the body cached, the server's receive can only deliver http.disconnect now.
        await read_body(scope, receive)
        lease: SlotLease | None = None
        watch = cancel_on_disconnect(replaying_receive(scope, receive), scope=scope)
        try:
            async with watch:
                with anyio.move_on_after(self.max_wait_s):
                    lease = await self.shared.acquire(
                        name, limit=limiter.limit, max_queue=self.max_queue if self.max_wait_s > 0 else 0
                    )
        except SlotsUnavailable:
            return None
        except SlotsRefused as refused:
            raise self._refusal(limiter, "the queue is full", shared=refused.pressure) from None
        if watch.disconnected:
            if lease is not None:  # granted just as the client left
                with anyio.CancelScope(shield=True):
                    await lease.release(0.0)
            raise ClientDisconnected()
        if lease is None:
            raise self._refusal(limiter, f"no slot came free within {self.max_wait_s:g} s", shared=self.shared.pressure(name))
        return self._holding(limiter, lease)

    @staticmethod
    def _holding(limiter: _Limiter, lease: SlotLease) -> SlotLease:
        limiter.shared_held += 1  # counts against the fallback share, should the store go away
        return lease

    async def _admit(self, limiter: _Limiter, scope: Scope, receive: Receive, *, max_wait_s: float | None = None) -> None:
        """Return holding a slot, or raise ``Overloaded``/``RateLimited``/``ClientDisconnected``."""
        max_wait_s = self.max_wait_s if max_wait_s is None else max(max_wait_s, 0.0)
        if limiter.try_acquire():
            return
        if not self._queue_has_room(limiter):
            raise self._refusal(limiter, "the queue is full")
        # With the body cached, the server's receive can only deliver http.disconnect now.
        await read_body(scope, receive)
        if limiter.try_acquire():
            return
        if not self._queue_has_room(limiter):
            raise self._refusal(limiter, "the queue is full")
        waiter = limiter.enqueue()
        watch = cancel_on_disconnect(replaying_receive(scope, receive), scope=scope)  # the cached body first, then the server
        try:
            async with watch:
                with anyio.move_on_after(max_wait_s):
                    await waiter.event.wait()
        except BaseException:
            limiter.abandon(waiter)
            raise
        if watch.disconnected or not waiter.granted:
            limiter.abandon(waiter)
            if watch.disconnected:
                raise ClientDisconnected()
            raise self._refusal(limiter, f"no slot came free within {self.max_wait_s:g} s")

    def _queue_has_room(self, limiter: _Limiter) -> bool:
        return self.max_wait_s > 0 and len(limiter.waiters) < self.max_queue

    def _refusal(self, limiter: _Limiter, why: str, *, shared: SharedPressure | None = None) -> LmgateError:
        retry_after_s = limiter.retry_after_s(self.default_retry_after_s, shared=shared)
        if self.client_key is not None:
            return RateLimited(f"Too many concurrent requests for this key and {why}; try again later.",
                               retry_after_s=retry_after_s)
        return Overloaded(f"The upstream is at its concurrency limit and {why}; try again later.",
                          retry_after_s=retry_after_s)

    async def _serve(self, limiter: _Limiter, lease: SlotLease | None, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the inner app holding the slot (``lease``: a shared one); feed the adaptive limit its latency sample."""
        granted_at = self.clock()
        sampled = False
        # A client that left before the first byte tells nothing about latency (censored sample).
        client_left = False

        async def sampling_send(message: Message) -> None:
            nonlocal sampled
            if not sampled and message["type"] == "http.response.body" and (
                message.get("body") or not message.get("more_body", False)
            ):
                sampled = True
                limiter.observe_latency(self.clock() - granted_at)
            await send(message)

        try:
            await self.app(scope, receive, sampling_send)
        except (ClientDisconnected, anyio.get_cancelled_exc_class()):
            client_left = True
            raise
        finally:
            held_s = self.clock() - granted_at
            if not sampled and not client_left:
                limiter.observe_latency(held_s)  # e.g. a timeout before the first byte: slow
            limiter.release(held_s, shared=lease is not None)
            if lease is not None:
                with anyio.CancelScope(shield=True):  # bounded by the store's own deadline
                    await lease.release(held_s)


def _key_name(key: Key) -> str:
    client, model = key
    model_name = model or ALL
    return model_name if client is None else f"{client}/{model_name}"
