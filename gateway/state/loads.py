"""Model loads single flight across replicas: a leased claim and the load's state, on Redis.

Per upstream (``scope``), under one hash tag:

* ``m:<model>``: a hash, the model's last load as every replica sees it: ``state`` (loading,
  loaded, failed), ``token`` (this load's identity), ``owner`` (the replica running it),
  ``started`` (Redis's clock, ms), ``expected`` (seconds its owner expected), ``lease_until`` and,
  once it ended, ``error``, ``instance`` and ``seconds``;
* ``index``: a sorted set of the models loading now, scored by lease expiry, for the status page
  of the replicas that are not involved.

A replica whose request finds a model cold claims its load (the ``claim`` script): it wins unless
another replica's load is under way with a live lease; then it follows that load, asking again
with growing pauses (50 ms to 500 ms) until the outcome is there. The owner renews its lease every
``lease_s / 3`` (the shared state's heartbeat) while it loads, so a replica that dies (even by
SIGKILL) loses its claim within ``lease_s`` and one of the followers takes it over. A finished
load's outcome stays for a minute, for the followers' next question; the next cold request after
that claims a new load (after a failure, that is the retry).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from itertools import count

from redis.asyncio import Redis

from gateway.models.shared import Claim, LoadState, SharedLoad
from gateway.state.store import SharedState, StateUnavailable

__all__ = ["RedisLoads"]

#: How long a load's hash outlives its last renewal (its lease decides whether it is alive).
_LOADING_TTL_MS = 3600 * 1000
#: How long a finished load's outcome stays for the replicas that followed it.
_OUTCOME_TTL_MS = 60 * 1000

_FIELDS = "'state', 'token', 'owner', 'started', 'expected', 'lease_until', 'error', 'instance', 'seconds'"

# KEYS: hash, index. ARGV: token, owner, lease_ms, expected_s or '', following or '', ttl_ms, model.
# Returns {0 theirs (loading) | 1 mine | 2 outcome, state, token, owner, elapsed_ms, expected, error, instance, seconds}.
_CLAIM = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], {_FIELDS})
local state, token = f[1], f[2]
local function reply(kind)
  return {{kind, state, token, f[3], now - tonumber(f[4] or now), f[5] or '', f[7] or '', f[8] or '', f[9] or ''}}
end
if state == 'loading' and tonumber(f[6] or 0) > now then
  return reply(0)
end
if ARGV[5] ~= '' and token == ARGV[5] and (state == 'loaded' or state == 'failed') then
  return reply(2)
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'loading', 'token', ARGV[1], 'owner', ARGV[2], 'started', now,
  'expected', ARGV[4], 'lease_until', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {{1, 'loading', ARGV[1], ARGV[2], 0, ARGV[4], '', '', ''}}
"""

# KEYS: hash, index. ARGV: token, lease_ms, ttl_ms, model. Extends a load's lease while it is still this one.
_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'state', 'token')
if f[1] ~= 'loading' or f[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', until_)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], until_, ARGV[4])
return 1
"""

# KEYS: hash, index. ARGV: token, state, error, instance, seconds, ttl_ms, model.
_FINISH = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'error', ARGV[3], 'instance', ARGV[4], 'seconds', ARGV[5],
  'lease_until', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[7])
return 1
"""

# KEYS: index. ARGV: hash key prefix. Every live load: {model, state, token, owner, elapsed_ms, expected}...
_OBSERVE = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {{}}
for _, model in ipairs(redis.call('ZRANGE', KEYS[1], 0, 99)) do
  local f = redis.call('HMGET', ARGV[1] .. model, {_FIELDS})
  if f[1] == 'loading' then
    table.insert(out, {{model, f[1], f[2], f[3], now - tonumber(f[4] or now), f[5] or ''}})
  end
end
return out
"""


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: bytes | str | int) -> float | None:
    text = _text(value)
    return float(text) if text else None


class RedisLoads:
    """:class:`gateway.models.shared.SharedLoads` on Redis; see the module docstring."""

    def __init__(self, state: SharedState, *, scope: str = "default") -> None:
        self.state = state
        self.scope = scope  # an upstream's name: each upstream loads its own models
        self._claim = state.script(_CLAIM)
        self._renew = state.script(_RENEW)
        self._finish = state.script(_FINISH)
        self._observe = state.script(_OBSERVE)
        self._numbers = count()
        self._mine: dict[str, str] = {}  # model -> token of this replica's load under way
        self._elsewhere: dict[str, SharedLoad] = {}
        state.on_heartbeat(self.renew)
        state.on_heartbeat(self.observe)
        state.on_change(self._availability_changed)


    def _base(self) -> str:
        # One hash tag per upstream: the index and every model's hash stay together on a cluster.
        return "{" + self.state.key("loads", self.scope) + "}"

    def keys(self, model: str) -> list[str]:
        base = self._base()
        return [f"{base}:m:{model}", f"{base}:index"]

    async def claim(self, model: str, *, expected_s: float | None, following: str | None = None) -> Claim | None:
        token = f"{self.state.owner}:{next(self._numbers)}"
        args: list[str | int | float] = [token, self.state.owner, self.state.lease_ms, "" if expected_s is None else f"{expected_s:.3f}",
                following or "", _LOADING_TTL_MS, model]  # fmt: skip
        try:
            reply = await self._claim(self.keys(model), args)
        except StateUnavailable:
            return None
        kind, state, owner_token, owner, elapsed_ms, expected, error, instance, seconds = reply
        load = SharedLoad(
            model=model,
            state=_state(state),
            token=_text(owner_token),
            owner=_text(owner),
            elapsed_s=float(elapsed_ms) / 1000,
            expected_s=_number(expected),
            error=_text(error) or None,
            instance=_text(instance) or None,
            seconds=_number(seconds),
        )
        if kind == 1:
            self._mine[model] = token
            self._elsewhere.pop(model, None)
        elif load.state == "loading":
            self._elsewhere[model] = load
        else:
            self._elsewhere.pop(model, None)
        return Claim(mine=kind == 1, load=load)

    async def finish(self, claim: Claim, *, error: str | None, instance: str | None, seconds: float | None) -> None:
        model = claim.load.model
        if self._mine.get(model) == claim.load.token:
            del self._mine[model]
        state = "failed" if error is not None else "loaded"
        args: list[str | int | float] = [claim.load.token, state, error or "", instance or "", "" if seconds is None else f"{seconds:.3f}",
                _OUTCOME_TTL_MS, model]  # fmt: skip
        # Else the followers see the lease run out, claim the load and find the model loaded (or not).
        with suppress(StateUnavailable):
            await self._finish(self.keys(model), args)

    def elsewhere(self) -> Mapping[str, SharedLoad]:
        return self._elsewhere if self.state.available else {}

    async def renew(self) -> None:
        """Extend the leases of this replica's loads under way, in one round trip."""
        mine = list(self._mine.items())
        if not mine:
            return

        async def renew_all(redis: Redis) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for model, token in mine:
                    await self._renew.queue(pipe, self.keys(model), [token, self.state.lease_ms, _LOADING_TTL_MS, model])
                await pipe.execute()

        await self.state.run(renew_all)

    async def observe(self) -> None:
        """Read which models other replicas are loading (for ``/lmgate/models``), once per heartbeat."""
        base = self._base()
        reply = await self._observe([f"{base}:index"], [f"{base}:m:"])
        seen: dict[str, SharedLoad] = {}
        for model, state, token, owner, elapsed_ms, expected in reply:
            if _text(owner) != self.state.owner:
                name = _text(model)
                seen[name] = SharedLoad(name, _state(state), _text(token), _text(owner), float(elapsed_ms) / 1000,
                                        _number(expected))  # fmt: skip
        self._elsewhere = seen

    def _availability_changed(self, available: bool) -> None:
        if not available:
            self._elsewhere = {}


def _state(value: bytes | str) -> LoadState:
    text = _text(value)
    if text == "loaded":
        return "loaded"
    if text == "failed":
        return "failed"
    return "loading"
