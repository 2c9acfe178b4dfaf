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
are that local store's: the shared entries are Redis's to count (``INFO keyspace``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from gateway.state.store import SharedState, StateUnavailable
from middleware.cache import CachedResponse, CacheStats, MemoryStore
from middleware.types import Clock

__all__ = ["RedisCacheStore", "decode", "encode"]

_VERSION = 1


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

    def key(self, key: str) -> str:
        return self.state.key("cache", key)

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
            try:
                await self.state.run(lambda redis: redis.set(self.key(key), value, px=ttl_ms))
                return
            except StateUnavailable:
                pass  # kept here instead, for this replica
        await self.fallback.put(key, response, ttl_s=ttl_s)

    def stats(self) -> CacheStats:
        return self.fallback.stats()
