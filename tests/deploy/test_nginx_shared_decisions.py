"""Replicas that act as one, beyond slots: real lmgate processes share model loads, circuit breakers
and the response cache through a real redis-server, in front of the LM Studio simulator.

The simulator's counters are the proof: ten cold requests spread over three replicas start one
load; failures through one replica open the circuit of another, which then refuses without
asking LM Studio; an answer cached by one replica is a hit on another. With Redis stopped each
replica decides alone and keeps serving; with Redis back they share again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from gateway.simulator import SimModel, Simulator

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WARM, COLD, LATER = "qwen2.5-7b-instruct", "cold-8b", "later-3b"
CHAT = "/v1/chat/completions"


def settings(redis_url: str) -> dict[str, Any]:
    return {
        "state": {"redis_url": redis_url, "lease_s": 1.0},
        "cache": {"enabled": True},
        "circuit_breaker": {"failure_threshold": 3, "reset_timeout_s": 60},
        "retry": {"enabled": False},
        "models": {"heartbeat_s": 0.2},
    }


def simulator() -> Simulator:
    fast = {"tokens_per_second": 500.0, "ttft_base_s": 0.0, "ttft_per_prompt_token_s": 0.0}
    return Simulator(
        models=[
            SimModel(id=WARM, loaded=True, **fast),
            SimModel(id=COLD, load_delay_s=0.5, **fast),
            SimModel(id=LATER, load_delay_s=0.5, **fast),
        ]
    )


def chat(model: str, content: str = "Hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": content}], **extra}


async def spread(client: httpx.AsyncClient, urls: list[str], body: dict[str, Any], count: int) -> list[httpx.Response]:
    responses: list[httpx.Response] = []
    async with anyio.create_task_group() as tg:

        async def one(url: str) -> None:
            responses.append(await client.post(url + CHAT, json=body))

        for number in range(count):
            tg.start_soon(one, urls[number % len(urls)])
    return responses


async def poll_until(check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0) -> None:
    """Bounded poll of other processes' state (their view of Redis, an answer stored), not of test logic."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def shared_state(client: httpx.AsyncClient, urls: list[str], expected: str) -> bool:
    return {(await client.get(url + "/readyz")).json().get("shared_state") for url in urls} == {expected}


async def cache_entries(redis_url: str) -> int:
    """Answers stored in the shared cache (Redis's own view; asking a replica would ask LM Studio on a miss)."""
    redis = Redis.from_url(redis_url)
    try:
        return len([key async for key in redis.scan_iter(match="lmgate:cache:*")])
    finally:
        await redis.aclose()


async def stored(redis_url: str, count: int) -> None:
    """Wait until ``count`` answers are in the shared cache: the write follows the first answer's
    last byte, so it can land just after the client has read that answer."""
    async def enough() -> bool:
        return await cache_entries(redis_url) >= count

    await poll_until(enough)


async def test_three_replicas_share_one_load_one_circuit_and_one_cache(redis_server, lmgate_process, nginx):
    async with (
        simulator() as sim,
        lmgate_process(sim.url, settings(redis_server.url)) as a,
        lmgate_process(sim.url, settings(redis_server.url)) as b,
        lmgate_process(sim.url, settings(redis_server.url)) as c,
        nginx("replicas.conf", lmgate_ports=[a.port, b.port]) as proxy,
        httpx.AsyncClient(timeout=30.0, trust_env=False, limits=httpx.Limits(max_connections=32)) as client,
    ):
        urls = [a.url, b.url, c.url]
        # Ten cold requests over three replicas (and NGINX in front of two): one load.
        responses = await spread(client, [*urls, proxy.url], chat(COLD), 10)
        assert [r.status_code for r in responses] == [200] * 10
        assert sim.counters.loads_started == 1

        # An answer A cached is a hit on B, which never asks LM Studio.
        deterministic = chat(WARM, "Name a colour.", temperature=0)
        assert (await client.post(a.url + CHAT, json=deterministic)).headers["x-lmgate-cache"] == "miss"
        await stored(redis_server.url, 1)
        requests = sim.counters.requests
        assert (await client.post(b.url + CHAT, json=deterministic)).headers["x-lmgate-cache"] == "hit"
        assert sim.counters.requests == requests

        # Three failures through A open the circuit on C: it refuses without asking LM Studio.
        sim.inject_fault("http_error", count=3, status=500)
        for _ in range(3):
            assert (await client.post(a.url + CHAT, json=chat(WARM))).status_code >= 500
        requests = sim.counters.requests
        refused = await client.post(c.url + CHAT, json=chat(WARM))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "circuit_open"
        assert sim.counters.requests == requests
    opened = [r for r in c.logs() if r.get("event") == "circuit_state" and r.get("new_state") == "open"]
    assert len(opened) == 1  # C's own circuit followed the shared one (and said so once)


async def test_redis_stopped_mid_run_each_replica_decides_alone_then_they_share_again(redis_server, lmgate_process):
    async with (
        simulator() as sim,
        lmgate_process(sim.url, settings(redis_server.url)) as a,
        lmgate_process(sim.url, settings(redis_server.url)) as b,
        httpx.AsyncClient(timeout=30.0, trust_env=False) as client,
    ):
        urls = [a.url, b.url]
        redis_server.stop()
        await poll_until(lambda: shared_state(client, urls, "unavailable"))

        # Loads: each replica loads on its own (one load each at most), and serves.
        responses = await spread(client, urls, chat(COLD), 6)
        assert [r.status_code for r in responses] == [200] * 6
        assert 1 <= sim.counters.loads_started <= 2
        # Cache: each replica's own memory.
        deterministic = chat(WARM, "Name a colour.", temperature=0)
        assert (await client.post(a.url + CHAT, json=deterministic)).headers["x-lmgate-cache"] == "miss"
        assert (await client.post(b.url + CHAT, json=deterministic)).headers["x-lmgate-cache"] == "miss"
        # Circuits: A's opens alone; B still serves.
        sim.inject_fault("http_error", count=3, status=500)
        for _ in range(3):
            assert (await client.post(a.url + CHAT, json=chat(WARM))).status_code >= 500
        assert (await client.post(a.url + CHAT, json=chat(WARM))).json()["error"]["code"] == "circuit_open"
        assert (await client.post(b.url + CHAT, json=chat(WARM))).status_code == 200

        redis_server.start()  # empty: a restarted Redis without persistence
        await poll_until(lambda: shared_state(client, urls, "available"))
        loads = sim.counters.loads_started
        responses = await spread(client, urls, chat(LATER), 6)
        assert [r.status_code for r in responses] == [200] * 6
        assert sim.counters.loads_started == loads + 1
        again = chat(WARM, "Name a shape.", temperature=0)
        assert (await client.post(b.url + CHAT, json=again)).headers["x-lmgate-cache"] == "miss"
        await stored(redis_server.url, 1)  # Redis came back empty: this answer is its only entry
        assert (await client.post(a.url + CHAT, json=again)).headers["x-lmgate-cache"] == "hit"
        # The shared circuit (closed: Redis came back empty) is A's again.
        assert (await client.post(a.url + CHAT, json=chat(WARM))).status_code == 200
