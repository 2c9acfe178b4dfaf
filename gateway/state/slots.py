"""Concurrency slots shared by every replica: a semaphore with leases and a FIFO queue on Redis.

Per key (an upstream's ``*``, or a model with ``per_model``), four keys under one hash tag:

* ``holders``: a sorted set of slot tokens scored by lease expiry (Redis's own clock, in ms). The
  acquire script first drops the expired ones, so a replica that dies (even by SIGKILL) holds its
  slots for at most ``lease_s``. Each replica renews the leases of its own running requests
  every ``lease_s / 3`` in one pipeline (one task per replica, not one per request).
* ``waiters``: a sorted set of queued tokens scored by arrival (a ticket from ``tickets``), and
  ``deadlines``, the same tokens scored by expiry: a waiter renews its place each time it asks
  again, and one whose replica died drops out of the queue within ``lease_s``.
* ``hold``: the average time a slot stays taken, across replicas, for Retry-After.

A request takes a slot at once when fewer requests wait than slots are free (no barging past the
queue); otherwise it joins the queue, unless ``max_queue`` already wait, and may take a slot only
once it is among the first ``limit - in_use`` waiters: FIFO across replicas, in arrival order
at Redis. Waiters ask again after a short, growing pause (5 ms to 50 ms), at once when a slot
of the same key is released on their own replica.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass
from itertools import count

import anyio
from redis.asyncio import Redis

from gateway.state.store import SharedState, StateUnavailable
from middleware.slots import SharedPressure, SlotsRefused

__all__ = ["RedisSlots"]

_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.05
#: How long the queue's counters outlive their last use (a key whose model is never asked again).
_IDLE_TTL_MS = 24 * 3600 * 1000
_MAX_KEYS_SEEN = 1024

# KEYS: holders, waiters, deadlines, tickets, hold. ARGV: token, limit, lease_ms, max_queue, idle_ttl_ms.
# Returns {granted (1 yes, 0 queued, -1 queue full), in use, queued, hold ms or ""}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token, limit, lease, max_queue = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
for _, dead in ipairs(gone) do
  redis.call('ZREM', KEYS[2], dead)
  redis.call('ZREM', KEYS[3], dead)
end
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
local hold = redis.call('GET', KEYS[5]) or ''
local in_use = redis.call('ZCARD', KEYS[1])
local queued = redis.call('ZCARD', KEYS[2])
if redis.call('ZSCORE', KEYS[1], token) then
  redis.call('ZADD', KEYS[1], now + lease, token)
  return {1, in_use, queued, hold}
end
local free = limit - in_use
local rank = redis.call('ZRANK', KEYS[2], token)
if not rank then
  if queued < free then
    redis.call('ZADD', KEYS[1], now + lease, token)
    return {1, in_use + 1, queued, hold}
  end
  if queued >= max_queue then
    return {-1, in_use, queued, hold}
  end
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), token)
  rank = queued
  queued = queued + 1
end
if rank < free then
  redis.call('ZREM', KEYS[2], token)
  redis.call('ZREM', KEYS[3], token)
  redis.call('ZADD', KEYS[1], now + lease, token)
  return {1, in_use + 1, queued - 1, hold}
end
redis.call('ZADD', KEYS[3], now + lease, token)
return {0, in_use, queued, hold}
"""

# KEYS: holders, waiters, deadlines, tickets, hold. ARGV: token, held_ms (negative: left the queue).
# Returns {in use, queued, hold ms or ""}.
_RELEASE = """
local held = tonumber(ARGV[2])
local was_holding = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if was_holding == 1 and held >= 0 then
  local old = tonumber(redis.call('GET', KEYS[5]) or '')
  local new = held
  if old then new = old * 0.8 + held * 0.2 end
  redis.call('SET', KEYS[5], string.format('%.1f', new), 'PX', ARGV[3])
end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('GET', KEYS[5]) or ''}
"""

# KEYS: holders. ARGV: lease_ms, tokens... Extends the leases still held (XX: never re-adds one
# that expired meanwhile, whose slot may have gone to someone else).
_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', until_, ARGV[i])
end
return renewed
"""


@dataclass
class _Lease:
    """One shared slot held by this replica (``SlotLease``)."""

    slots: RedisSlots
    key: str
    token: str
    released: bool = False

    async def release(self, held_s: float) -> None:
        if not self.released:
            self.released = True
            await self.slots._release(self.key, self.token, held_ms=held_s * 1000)


class RedisSlots:
    """:class:`middleware.slots.SharedSlots` on Redis; see the module docstring."""

    def __init__(self, state: SharedState, *, scope: str = "default") -> None:
        self.state = state
        self.scope = scope  # an upstream's name: each upstream has its own slots
        self._acquire = state.script(_ACQUIRE)
        self._release_script = state.script(_RELEASE)
        self._renew = state.script(_RENEW)
        self._numbers = count()
        self._held: dict[str, set[str]] = defaultdict(set)  # key -> tokens of this replica's running requests
        self._seen: dict[str, SharedPressure] = {}
        self._wakeups: dict[str, anyio.Event] = {}
        state.on_heartbeat(self.renew)

    @property
    def available(self) -> bool:
        return self.state.available


    def pressure(self, key: str) -> SharedPressure | None:
        return self._seen.get(key)

    def keys(self, key: str) -> list[str]:
        # One hash tag per semaphore: its keys stay together on a Redis cluster.
        base = "{" + self.state.key("slots", self.scope, key) + "}"
        return [f"{base}:{part}" for part in ("holders", "waiters", "deadlines", "tickets", "hold")]

    async def acquire(self, key: str, *, limit: int, max_queue: int) -> _Lease:
        token = f"{self.state.owner}:{next(self._numbers)}"
        keys = self.keys(key)
        pause_s = _POLL_MIN_S
        granted = False
        try:
            while True:
                reply = await self._acquire(keys, [token, limit, self.state.lease_ms, max_queue, _IDLE_TTL_MS])
                outcome, in_use, queued, hold = reply
                self._see(key, in_use, queued, hold)
                if outcome == 1:
                    granted = True
                    self._held[key].add(token)
                    return _Lease(self, key, token)
                if outcome == -1:
                    pressure = self._seen[key]
                    raise SlotsRefused(pressure)
                with anyio.move_on_after(pause_s):
                    await self._wakeup(key).wait()
                pause_s = min(pause_s * 2, _POLL_MAX_S)
        finally:
            if not granted:
                # Cancelled (the wait is over, or the client left), refused or failed: leave the
                # queue, and give back a slot granted by a call whose answer was lost on the way.
                with anyio.CancelScope(shield=True):
                    await self._leave(key, token)

    async def renew(self) -> None:
        """Extend the leases of every running request of this replica, in one round trip."""
        held = [(key, sorted(tokens)) for key, tokens in self._held.items() if tokens]
        if not held:
            return

        async def renew_all(redis: Redis) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for key, tokens in held:
                    await self._renew.queue(pipe, [self.keys(key)[0]], [self.state.lease_ms, *tokens])
                await pipe.execute()

        await self.state.run(renew_all)

    async def _release(self, key: str, token: str, *, held_ms: float) -> None:
        tokens = self._held.get(key)
        if tokens is not None:
            tokens.discard(token)
            if not tokens:
                del self._held[key]
        try:
            in_use, queued, hold = await self._release_script(self.keys(key), [token, round(held_ms), _IDLE_TTL_MS])
        except StateUnavailable:
            return  # the lease expires on its own
        self._see(key, in_use, queued, hold)
        self._wake(key)  # a waiter here may take the slot at once, without waiting for its next poll

    async def _leave(self, key: str, token: str) -> None:
        with suppress(StateUnavailable):  # else the place in the queue expires on its own
            await self._release_script(self.keys(key), [token, -1, _IDLE_TTL_MS])

    def _see(self, key: str, in_use: int, queued: int, hold: bytes | str) -> None:
        hold_s = float(hold) / 1000 if hold else None
        if key not in self._seen and len(self._seen) >= _MAX_KEYS_SEEN:
            self._seen.clear()  # arbitrary model names must not grow memory; seen again on next use
        self._seen[key] = SharedPressure(in_flight=int(in_use), queued=int(queued), hold_s=hold_s)

    def _wakeup(self, key: str) -> anyio.Event:
        event = self._wakeups.get(key)
        if event is None:
            event = self._wakeups[key] = anyio.Event()
        return event

    def _wake(self, key: str) -> None:
        event = self._wakeups.pop(key, None)
        if event is not None:
            event.set()
