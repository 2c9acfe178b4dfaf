"""Circuit breakers shared by every replica: one state and one failure window per circuit, on Redis.

Per circuit (an upstream's name, or ``name:model`` with ``per_model``), one hash under its own
hash tag holds what ``middleware.circuit_breaker.Breaker`` keeps in memory: ``state``, ``gen``
(the generation, changed by every transition), ``opened`` (Redis's clock, ms), ``consecutive``
failures, the half-open probes' ``successes``, the failure window in ten buckets (``n<i>`` outcomes
and ``f<i>`` failures of bucket ``i``), and the probe lease (``prober``, ``prober_until``).

* ``admit`` (each request): an open circuit whose cool-down has passed turns half-open, for every
  replica at once. Half-open, the first replica to ask takes the probe lease (``lease_s``,
  renewed while its probes run): it alone sends probes, at most ``half_open_max_probes`` at a
  time (counted here, in the replica); the others shed their requests with ``Retry-After: 1``.
* ``record`` (each outcome that says something about the upstream): the same rules as the local
  breaker, applied atomically to the shared window; outcomes of an older generation are ignored.

A circuit's hash expires a day after its last use. Two round trips per request on loopback
(well under a millisecond); while Redis cannot answer, each replica's own circuit decides.
"""

from __future__ import annotations

from collections import defaultdict

from redis.asyncio import Redis

from gateway.state.store import SharedState, StateUnavailable
from middleware.circuits import BreakerPolicy, CircuitVerdict

__all__ = ["RedisCircuits"]

#: A circuit's hash outlives its last use by this long (a model never asked for again).
_IDLE_TTL_MS = 24 * 3600 * 1000
#: Retry-After for a request shed while another replica probes: the probe ends any moment.
_PROBING_RETRY_AFTER_S = 1.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: hash. ARGV: owner, reset_ms, lease_ms, ttl_ms.
# Returns {0 refused | 1 admitted | 2 admitted as this replica's probe, state, gen, cool-down left ms}.
_ADMIT = _NOW + """
local f = redis.call('HMGET', KEYS[1], 'state', 'gen', 'opened', 'prober', 'prober_until')
local state, gen, prober = f[1] or 'closed', tonumber(f[2] or 0), f[4]
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if state == 'open' then
  local left = tonumber(f[3] or 0) + tonumber(ARGV[2]) - now
  if left > 0 then return {0, state, gen, left} end
  state, gen, prober = 'half_open', gen + 1, false
  redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'successes', 0)
  redis.call('HDEL', KEYS[1], 'prober', 'prober_until')
end
if state == 'closed' then return {1, state, gen, 0} end
if prober and prober ~= ARGV[1] and tonumber(f[5] or 0) > now then return {0, state, gen, 0} end
redis.call('HSET', KEYS[1], 'prober', ARGV[1], 'prober_until', now + tonumber(ARGV[3]))
return {2, state, gen, 0}
"""

# KEYS: hash. ARGV: gen, failed (1/0), threshold, ratio or '', min_requests, window_ms, max_probes, reset_ms, ttl_ms.
# Returns {state, gen, cool-down left ms}.
_RECORD = _NOW + """
local f = redis.call('HMGET', KEYS[1], 'state', 'gen', 'opened')
local state, gen, opened = f[1] or 'closed', tonumber(f[2] or 0), tonumber(f[3] or 0)
local function reply()
  local left = 0
  if state == 'open' then left = math.max(0, opened + tonumber(ARGV[8]) - now) end
  return {state, gen, left}
end
if tonumber(ARGV[1]) ~= gen then return reply() end
local failed = ARGV[2] == '1'
local function clear_window()
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.match(field, '^[nf]%-?%d+$') then redis.call('HDEL', KEYS[1], field) end
  end
end
local function move(new)
  state, gen = new, gen + 1
  redis.call('HSET', KEYS[1], 'state', new, 'gen', gen, 'successes', 0, 'consecutive', 0)
  redis.call('HDEL', KEYS[1], 'prober', 'prober_until')
  if new == 'open' then opened = now; redis.call('HSET', KEYS[1], 'opened', now) end
  clear_window()
end
redis.call('PEXPIRE', KEYS[1], ARGV[9])
if state == 'half_open' then
  if failed then
    move('open')
  elseif redis.call('HINCRBY', KEYS[1], 'successes', 1) >= tonumber(ARGV[7]) then
    move('closed')
  end
  return reply()
end
if state ~= 'closed' then return reply() end
local width = tonumber(ARGV[6]) / 10
local current = math.floor(now / width)
redis.call('HINCRBY', KEYS[1], 'n' .. current, 1)
if failed then redis.call('HINCRBY', KEYS[1], 'f' .. current, 1) end
local total, failures = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local kind, index = string.match(all[i], '^([nf])(%-?%d+)$')
  if kind then
    if tonumber(index) <= current - 10 then
      redis.call('HDEL', KEYS[1], all[i])
    elseif kind == 'n' then
      total = total + tonumber(all[i + 1])
    else
      failures = failures + tonumber(all[i + 1])
    end
  end
end
local consecutive = 0
if failed then consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
else redis.call('HSET', KEYS[1], 'consecutive', 0) end
local ratio_exceeded = ARGV[4] ~= '' and total >= tonumber(ARGV[5]) and failures >= tonumber(ARGV[4]) * total
if failed and (consecutive >= tonumber(ARGV[3]) or ratio_exceeded) then move('open') end
return reply()
"""

# KEYS: hash. ARGV: owner, lease_ms. Extends this replica's probe lease while its probes run.
_RENEW = _NOW + """
if redis.call('HGET', KEYS[1], 'prober') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'prober_until', now + tonumber(ARGV[2]))
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisCircuits:
    """:class:`middleware.circuits.SharedCircuits` on Redis; see the module docstring."""

    def __init__(self, state: SharedState, *, scope: str = "default") -> None:
        self.state = state
        self.scope = scope  # an upstream's name: its circuits are its own
        self._admit = state.script(_ADMIT)
        self._record = state.script(_RECORD)
        self._renew = state.script(_RENEW)
        self._probing: dict[str, int] = defaultdict(int)  # key -> this replica's probes in flight
        state.on_heartbeat(self.renew)

    @property
    def available(self) -> bool:
        return self.state.available


    def hash_key(self, key: str) -> str:
        return "{" + self.state.key("circuit", self.scope, key) + "}"

    async def admit(self, key: str, policy: BreakerPolicy) -> CircuitVerdict | None:
        reset_ms = round(policy.reset_timeout_s * 1000)
        try:
            kind, state, gen, left_ms = await self._admit([self.hash_key(key)], [self.state.owner, reset_ms, self.state.lease_ms, _IDLE_TTL_MS])
        except StateUnavailable:
            return None
        state, gen = _text(state), int(gen)
        if kind == 2:
            if self._probing[key] >= policy.half_open_max_probes:
                return CircuitVerdict(state, admitted=False, probe=False, generation=gen, retry_after_s=_PROBING_RETRY_AFTER_S)
            self._probing[key] += 1
            return CircuitVerdict(state, admitted=True, probe=True, generation=gen, retry_after_s=0.0)
        retry_after_s = int(left_ms) / 1000 if state == "open" else _PROBING_RETRY_AFTER_S
        return CircuitVerdict(state, admitted=kind == 1, probe=False, generation=gen, retry_after_s=retry_after_s)

    async def record(
        self, key: str, verdict: CircuitVerdict, failed: bool | None, policy: BreakerPolicy
    ) -> CircuitVerdict | None:
        if verdict.probe:
            self._probing[key] -= 1
            if self._probing[key] <= 0:
                del self._probing[key]
        if failed is None:
            return None
        ratio = "" if policy.failure_ratio is None else repr(policy.failure_ratio)
        args: list[str | int | float] = [
            verdict.generation, 1 if failed else 0, policy.failure_threshold, ratio, policy.min_requests,
            round(policy.window_s * 1000), policy.half_open_max_probes, round(policy.reset_timeout_s * 1000), _IDLE_TTL_MS,
        ]  # fmt: skip
        try:
            state, gen, left_ms = await self._record([self.hash_key(key)], args)
        except StateUnavailable:
            return None
        return CircuitVerdict(_text(state), admitted=False, probe=False, generation=int(gen), retry_after_s=int(left_ms) / 1000)

    async def renew(self) -> None:
        """Extend the probe lease of every circuit this replica is probing, in one round trip."""
        probing = [key for key, count in self._probing.items() if count > 0]
        if not probing:
            return

        async def renew_all(redis: Redis) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for key in probing:
                    await self._renew.queue(pipe, [self.hash_key(key)], [self.state.owner, self.state.lease_ms])
                await pipe.execute()

        await self.state.run(renew_all)
