"""Replicas that act as one: two real lmgate processes behind deploy/nginx/replicas.conf share their
concurrency slots through a real redis-server, in front of the LM Studio simulator.

The simulator's own counters are the proof: however requests spread over the replicas, LM Studio
never runs more than the one shared limit at once; a replica killed with SIGKILL gives its slots
back within the lease; and with Redis gone each replica serves on its own share of the limit,
then shares again once Redis is back.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest

from gateway.simulator import SimModel, SimSettings, Simulator

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MODEL = "qwen2.5-7b-instruct"
CHAT = "/v1/chat/completions"
LIMIT = 4


def shared_settings(redis_url: str, **concurrency: Any) -> dict[str, Any]:
    return {
        # A generous call deadline: these tests are about sharing, and a busy CI machine's stall must
        # not be taken for an outage (which leaves one replica on its fallback share).
        "state": {"redis_url": redis_url, "lease_s": 1.0, "fallback_limit_share": 0.25, "timeout_ms": 1000},
        "concurrency": {"limit": LIMIT, "max_queue": 16, "max_wait_s": 30, **concurrency},
        "retry": {"enabled": False},
    }


def simulator(*, answer_tokens: int = 24) -> Simulator:
    # LM Studio with room for every stream at once: only lmgate's limit can hold them back.
    # ``answer_tokens``: the natural answer length (max_tokens only cuts it shorter).
    model = SimModel(id=MODEL, loaded=True, parallel=64, tokens_per_second=50.0, ttft_base_s=0.01,
                     ttft_per_prompt_token_s=0.0)
    return Simulator(models=[model], settings=SimSettings(completion_tokens=answer_tokens))


def chat(max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "stream": True, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]}


async def stream(client: httpx.AsyncClient, url: str, max_tokens: int, results: list[tuple[int, dict[str, str], bytes]]) -> None:
    async with client.stream("POST", url + CHAT, json=chat(max_tokens)) as response:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        results.append((response.status_code, dict(response.headers), body))


async def poll_until(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    """Bounded poll of other processes' state (their readiness), not of the test's own logic."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def shared_state_of(client: httpx.AsyncClient, url: str) -> str | None:
    return (await client.get(url + "/readyz")).json().get("shared_state")


async def queued_on(client: httpx.AsyncClient, url: str, count: int) -> bool:
    """Whether the replica at ``url`` sees ``count`` requests in the shared queue (its /metrics)."""
    metrics = (await client.get(url + "/metrics")).text
    return re.search(rf'^lmgate_concurrency_queued{{[^}}]*key="\*"[^}}]*}} {float(count)}$', metrics, re.MULTILINE) is not None


def served_or_refused(results: list[tuple[int, dict[str, str], bytes]]) -> tuple[int, int]:
    served = [body for status, _, body in results if status == 200]
    refused = [(headers, body) for status, headers, body in results if status == 503]
    assert len(served) + len(refused) == len(results), [status for status, _, _ in results]
    assert all(body.endswith(b"data: [DONE]\n\n") for body in served)
    assert all(int(headers["retry-after"]) >= 1 and b'"overloaded"' in body for headers, body in refused)
    return len(served), len(refused)


async def test_thirty_streams_over_two_replicas_never_exceed_the_one_shared_limit(redis_server, lmgate_process, nginx):
    async with (
        simulator() as sim,
        lmgate_process(sim.url, shared_settings(redis_server.url)) as a,
        lmgate_process(sim.url, shared_settings(redis_server.url)) as b,
        nginx("replicas.conf", lmgate_ports=[a.port, b.port]) as proxy,
        httpx.AsyncClient(timeout=60.0, trust_env=False, limits=httpx.Limits(max_connections=64)) as client,
    ):
        results: list[tuple[int, dict[str, str], bytes]] = []
        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(stream, client, proxy.base, 10, results)
        assert {await shared_state_of(client, a.url), await shared_state_of(client, b.url)} == {"available"}
    served, refused = served_or_refused(results)
    # Four slots and sixteen places in the queue, shared: at least 20 served, the rest refused.
    assert served >= LIMIT + 16 and served + refused == 30
    assert sim.counters.max_active_generations == LIMIT
    assert {record.get("event") for record in a.logs()} & {"state_unavailable"} == set()


async def test_a_replica_killed_while_holding_slots_gives_them_back_within_the_lease(redis_server, lmgate_process):
    async with (
        simulator(answer_tokens=100_000) as sim,  # A's streams run until A dies, however slow the machine
        lmgate_process(sim.url, shared_settings(redis_server.url)) as a,
        lmgate_process(sim.url, shared_settings(redis_server.url)) as b,
        httpx.AsyncClient(timeout=60.0, trust_env=False) as client,
    ):
        doomed: list[tuple[int, dict[str, str], bytes]] = []
        results: list[tuple[int, dict[str, str], bytes]] = []
        async with anyio.create_task_group() as tg:

            async def doomed_stream() -> None:
                with pytest.raises(httpx.HTTPError):  # its replica dies under it
                    await stream(client, a.url, 100_000, doomed)

            for _ in range(LIMIT):
                tg.start_soon(doomed_stream)
            await sim.wait_for(lambda c: c.active_generations == LIMIT, timeout=10)
            for _ in range(LIMIT):
                tg.start_soon(stream, client, b.url, 10, results)
            # A holds every shared slot: B's requests queue behind it instead of running beside it.
            await poll_until(lambda: queued_on(client, b.url, LIMIT), timeout=10, what="B's requests queue")
            a.process.send_signal(signal.SIGKILL)  # no release, no goodbye: only the lease frees the slots
            # B's requests run once A's leases (1 s) have run out.
            await sim.wait_for(lambda c: c.generations_completed >= LIMIT, timeout=15)
        assert [status for status, _, _ in results] == [200] * LIMIT
        assert sim.counters.max_active_generations == LIMIT


async def test_redis_stopped_mid_run_leaves_each_replica_its_share_then_shares_again(redis_server, lmgate_process, nginx):
    async with (
        simulator() as sim,
        lmgate_process(sim.url, shared_settings(redis_server.url)) as a,
        lmgate_process(sim.url, shared_settings(redis_server.url)) as b,
        nginx("replicas.conf", lmgate_ports=[a.port, b.port]) as proxy,
        httpx.AsyncClient(timeout=60.0, trust_env=False, limits=httpx.Limits(max_connections=64)) as client,
    ):

        async def both(state: str) -> bool:
            return {await shared_state_of(client, a.url), await shared_state_of(client, b.url)} == {state}

        async def burst(count: int) -> list[tuple[int, dict[str, str], bytes]]:
            sim.counters.max_active_generations = 0
            results: list[tuple[int, dict[str, str], bytes]] = []
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(stream, client, proxy.base, 10, results)
            return results

        redis_server.stop()
        await poll_until(lambda: both("unavailable"), timeout=10, what="both replicas notice Redis is gone")
        assert (await client.get(a.url + "/readyz")).status_code == 200  # degraded, still ready
        outage = await burst(12)
        # Alone, each replica admits a quarter of the limit: one stream each, two at most in all.
        assert served_or_refused(outage) == (12, 0)
        assert 1 <= sim.counters.max_active_generations <= 2

        redis_server.start()
        await poll_until(lambda: both("available"), timeout=10, what="both replicas find Redis again")
        again = await burst(12)
        assert served_or_refused(again) == (12, 0)
        assert sim.counters.max_active_generations == LIMIT
    events = [record.get("event") for record in a.logs() if str(record.get("event", "")).startswith("state_")]
    assert events == ["state_available", "state_unavailable", "state_available"]
