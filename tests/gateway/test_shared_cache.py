"""gateway/state/cache.py against a real redis-server, then two gateways sharing one cache.

An answer stored through one client is read through another (as separate replicas do), with its
frames, its kind and its age intact; Redis keeps it for the TTL; an oversized answer is not
stored; while Redis is gone each replica caches in its own memory, and shares again once it is
back. End to end: a hit on gateway B for an answer gateway A cached never reaches the upstream.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import serve_gateway
from gateway.config.settings import Config
from gateway.simulator import SimModel, Simulator
from gateway.simulator.testing import parse_sse, unstamped
from gateway.state import SharedState, StateUnavailable
from gateway.state.cache import RedisCacheStore
from middleware.cache import CachedResponse, CacheMiddleware, MemoryStore
from tests.gateway.replicas import replicas as shared_replicas

pytestmark = pytest.mark.anyio

KEY = "0f" * 32


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def replicas(url: str, count: int = 2, **options: Any) -> AbstractAsyncContextManager[list[RedisCacheStore]]:
    def store(state: SharedState) -> RedisCacheStore:
        memory = MemoryStore(max_entries=100, max_bytes=1 << 20)
        return RedisCacheStore(state, fallback=memory, **{"max_entry_bytes": 1024, **options})

    return shared_replicas(url, store, count)


def stream_answer(stored_at: float = 0.0) -> CachedResponse:
    frames = (b'data: {"choices":[{"delta":{"content":"Blue"}}]}\n\n', b"data: [DONE]\n\n")
    return CachedResponse(content_type=b"text/event-stream", frames=frames, stream=True, stored_at=stored_at)


async def test_an_answer_stored_by_one_replica_is_read_by_another_with_its_age(redis_server):
    async with replicas(redis_server.url) as (a, b):
        # Each replica has its own monotonic clock; the wall clock is the one they share.
        a.clock, a.wall = Clock(100.0), Clock(1_000_000.0)
        b.clock, b.wall = Clock(5.0), Clock(1_000_007.0)
        await a.put(KEY, stream_answer(stored_at=98.0), ttl_s=60)  # stored at a's 98 s: 2 s ago
        found = await b.get(KEY)
        assert found is not None
        assert (found.frames, found.stream, found.content_type) == (stream_answer().frames, True, b"text/event-stream")
        assert found.stored_at == pytest.approx(5.0 - 9.0)  # 2 s old when stored, 7 s later at b
        assert await b.get("1e" * 32) is None


async def test_redis_keeps_an_answer_for_the_ttl_and_never_one_too_large(redis_server):
    async with replicas(redis_server.url, 1, max_entry_bytes=64) as (a,):
        small = CachedResponse(content_type=b"application/json", frames=(b'{"id":"x"}',), stream=False, stored_at=0.0)
        await a.put(KEY, small, ttl_s=30)
        ttl_ms = await a.state.run(lambda r: r.pttl(a.key(KEY)))
        assert 29_000 < ttl_ms <= 30_000
        large = CachedResponse(content_type=b"application/json", frames=(b"x" * 65,), stream=False, stored_at=0.0)
        await a.put("1e" * 32, large, ttl_s=30)
        assert await a.state.run(lambda r: r.exists(a.key("1e" * 32))) == 0
        assert a.fallback.stats().entries == 0  # not kept locally either


async def test_a_value_that_is_not_an_answer_is_a_miss(redis_server):
    async with replicas(redis_server.url, 1) as (a,):
        await a.state.run(lambda r: r.set(a.key(KEY), b"not an answer"))
        assert await a.get(KEY) is None


async def test_without_redis_each_replica_caches_alone_then_shares_again(redis_server):
    async with replicas(redis_server.url) as (a, b):
        redis_server.stop()
        await a.put(KEY, stream_answer(), ttl_s=60)
        assert await a.get(KEY) is not None  # from its own memory
        assert await b.get(KEY) is None
        redis_server.start()
        with anyio.fail_after(10):  # the probe finds Redis again
            while not (a.state.available and b.state.available):
                await anyio.sleep(0.02)
        await b.put(KEY, stream_answer(), ttl_s=60)
        assert await a.get(KEY) is not None and await a.state.run(lambda r: r.exists(a.key(KEY))) == 1


# -- two gateways in front of one simulator ------------------------------------------------------------

MODEL = "qwen2.5-7b-instruct"


def config(sim_url: str, redis_url: str) -> Config:
    document = {
        "upstream": {"url": sim_url},
        "cache": {"enabled": True},
        "retry": {"enabled": False},
        "state": {"redis_url": redis_url},
    }
    return Config.model_validate(document)


async def stored(cache: CacheMiddleware | None) -> None:
    """Bounded poll of Redis until one answer is stored (the write follows the response's last byte)."""
    assert cache is not None and isinstance(cache.store, RedisCacheStore)
    state = cache.store.state
    with anyio.fail_after(5):
        while not await state.run(lambda r: r.keys(state.key("cache", "*"))):
            await anyio.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hit_on_one_gateway_for_an_answer_another_cached(redis_server, stream):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "stream": stream}
    model = SimModel(id=MODEL, loaded=True, tokens_per_second=500.0, ttft_base_s=0.01)
    async with (
        Simulator(models=[model]) as sim,
        serve_gateway(config(sim.url, redis_server.url)) as (a, gateway_a),
        serve_gateway(config(sim.url, redis_server.url)) as (b, _),
        httpx.AsyncClient(timeout=10.0, trust_env=False) as client,
    ):
        first = await client.post(a + "/v1/chat/completions", json=body)
        # A stores the answer once it went out whole: wait for it to reach Redis.
        await stored(gateway_a.stack.cache)
        second = await client.post(b + "/v1/chat/completions", json=body)
        assert (first.headers["x-lmgate-cache"], second.headers["x-lmgate-cache"]) == ("miss", "hit")
        assert sim.counters.requests == 1
        assert unstamped(second.content) == unstamped(first.content)
        if stream:
            assert parse_sse(second.content)[-1].data == "[DONE]"


async def test_the_shared_answers_are_counted_for_every_replica_until_they_expire(redis_server):
    async with replicas(redis_server.url) as (a, b):
        assert b.shared_stats() is None  # not counted yet
        await a.put(KEY, stream_answer(), ttl_s=60)
        await a.put(KEY, stream_answer(), ttl_s=60)  # the same answer again: still one
        await a.put("1e" * 32, stream_answer(), ttl_s=60)
        await b.count()
        counted = b.shared_stats()
        assert counted is not None and counted.entries == 2
        both = [len(await a.state.run(lambda r, key=key: r.get(a.key(key)))) for key in (KEY, "1e" * 32)]
        assert counted.bytes == sum(both)  # as stored (the storing time's digits vary)
        assert b.stats().entries == 0  # its own store holds nothing: the numbers are the shared ones
        await a.put("2d" * 32, stream_answer(), ttl_s=0.05)
        with anyio.fail_after(5):  # once its TTL runs out, a count drops it, and its bytes
            while True:
                await b.count()
                if b.shared_stats() == type(counted)(entries=2, bytes=sum(both), evictions=0):
                    break
                await anyio.sleep(0.02)
        redis_server.stop()
        with pytest.raises(StateUnavailable):
            await b.count()
        assert b.shared_stats() is None  # unavailable: not counted now
