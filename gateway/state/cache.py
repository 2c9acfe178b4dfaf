"""The response cache in Redis: an answer cached by one replica is a hit on every other.

:class:`RedisCacheStore` is a :class:`middleware.cache.CacheStore`. Each answer is one Redis
string under ``<prefix>:cache:<sha256>`` (the cache layer's own key), written with the cache's
TTL (``PX``): Redis drops it when it expires, and its ``maxmemory`` policy bounds the whole (an
LRU policy suits a cache). Answers larger than ``max_entry_bytes`` are not stored.

The value is a small JSON header (content type, stream or not, when it was stored, the size of
each frame) and a newline, then the frames themselves. The storing time is wall-clock time, the
one clock replicas share, turned back into the reader's own clock for ``Age``.

While Redis cannot answer (and for a call that fails), the replica keeps and looks up answers in
its own :class:`~middleware.cache.MemoryStore`, as a lone lmgate does; those stay local. ``stats``
are that local store's.

The shared answers are counted without scanning Redis: each write also records the answer's key,
size and expiry in an index (``{<prefix>:cache}:index``, a sorted set by expiry; ``:sizes``, a
hash; ``:bytes``, their total), in the same round trip. Once per heartbeat (``lease_s / 3``) a
replica drops the expired answers from the index and reads the count and the total:
:meth:`RedisCacheStore.shared_stats`, for the status page. Answers Redis itself evicted
(``maxmemory``) still count until their TTL ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from redis.asyncio import Redis

from gateway.state.store import SharedState, StateUnavailable
from middleware.cache import CachedResponse, CacheStats, MemoryStore
from middleware.types import Clock

__all__ = ["RedisCacheStore", "decode", "encode"]

_VERSION = 1
#: Expired answers dropped from the index per count, at most (the rest go at the next one).
_TRIM_BATCH = 1000

# KEYS: index, sizes, bytes. ARGV: cache key, size, ttl_ms. Records one written answer.
_INDEX = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or 0)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return 1
"""

# KEYS: index, sizes, bytes. ARGV: batch. Drops expired answers; returns {answers, bytes}.
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #gone > 0 then
  local freed = 0
  for _, size in ipairs(redis.call('HMGET', KEYS[2], unpack(gone))) do freed = freed + tonumber(size or 0) end
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('DECRBY', KEYS[3], freed)
end
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or 0)}
"""


def encode(response: CachedResponse, *, stored_wall: float) -> bytes:
    header = {
        "v": _VERSION,
        "content_type": response.content_type.decode("latin-1"),
        "stream": response.stream,
        "stored_at": stored_wall,
        "sizes": [len(frame) for frame in response.frames],
    }
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + b"".join(response.frames)


def decode(raw: bytes, *, now: float, now_wall: float) -> CachedResponse | None:
    """The answer in ``raw`` with ``stored_at`` on the reader's clock; None if it is not one."""
    head, _, body = raw.partition(b"\n")
    try:
        header = json.loads(head)
        sizes = [int(size) for size in header["sizes"]]
        if header.get("v") != _VERSION or sum(sizes) != len(body):
            return None
        age_s = max(0.0, now_wall - float(header["stored_at"]))
        content_type = str(header["content_type"]).encode("latin-1")
        stream = bool(header["stream"])
    except (ValueError, KeyError, TypeError):
        return None
    frames, offset = [], 0
    for size in sizes:
        frames.append(body[offset : offset + size])
        offset += size
    return CachedResponse(content_type=content_type, frames=tuple(frames), stream=stream, stored_at=now - age_s)


class RedisCacheStore:
    """A :class:`~middleware.cache.CacheStore` in Redis, with a local fallback; see the module docstring."""

    def __init__(
        self,
        state: SharedState,
        *,
        fallback: MemoryStore,
        max_entry_bytes: int,
        clock: Clock = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.fallback = fallback
        self.max_entry_bytes = max_entry_bytes
        self.clock = clock
        self.wall = wall
        self._index = state.script(_INDEX)
        self._count = state.script(_COUNT)
        self._shared: CacheStats | None = None
        state.on_heartbeat(self.count)
        state.on_change(self._availability_changed)

    def key(self, key: str) -> str:
        return self.state.key("cache", key)

    def index_keys(self) -> list[str]:
        # One hash tag: the count's script touches one cluster slot (the answers themselves are spread).
        base = "{" + self.state.key("cache") + "}"
        return [f"{base}:index", f"{base}:sizes", f"{base}:bytes"]

    async def get(self, key: str) -> CachedResponse | None:
        if not self.state.available:
            return await self.fallback.get(key)
        try:
            raw = await self.state.run(lambda redis: redis.get(self.key(key)))
        except StateUnavailable:
            return await self.fallback.get(key)
        if not isinstance(raw, bytes):
            return None
        return decode(raw, now=self.clock(), now_wall=self.wall())

    async def put(self, key: str, response: CachedResponse, *, ttl_s: float) -> None:
        if response.size > self.max_entry_bytes or ttl_s <= 0:
            return
        if self.state.available:
            value = encode(response, stored_wall=self.wall() - (self.clock() - response.stored_at))
            ttl_ms = max(1, round(ttl_s * 1000))

            async def write(redis: Redis) -> None:
                async with redis.pipeline(transaction=False) as pipe:  # one round trip
                    pipe.set(self.key(key), value, px=ttl_ms)
                    await self._index.queue(pipe, self.index_keys(), [key, len(value), ttl_ms])
                    await pipe.execute()

            try:
                await self.state.run(write)
                return
            except StateUnavailable:
                pass  # kept here instead, for this replica
        await self.fallback.put(key, response, ttl_s=ttl_s)

    def stats(self) -> CacheStats:
        """The local fallback store's numbers (what this replica keeps while Redis cannot answer)."""
        return self.fallback.stats()

    def shared_stats(self) -> CacheStats | None:
        """The shared answers and their bytes as last counted; None while Redis is unavailable
        or before the first count. No evictions: Redis evicts (``maxmemory``), and does not tell."""
        return self._shared if self.state.available else None

    async def count(self) -> None:
        """Drop expired answers from the index and count the rest (the shared state's heartbeat)."""
        entries, size = await self._count(self.index_keys(), [_TRIM_BATCH])
        self._shared = CacheStats(entries=int(entries), bytes=max(0, int(size)), evictions=0)

    def _availability_changed(self, available: bool) -> None:
        if not available:
            self._shared = None
