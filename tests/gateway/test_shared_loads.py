"""gateway/state/loads.py against a real redis-server, then whole gateways sharing their model loads.

Two or three ``SharedState`` clients stand for replicas: one claims a model's load, the others
follow it to its outcome; a claim whose owner dies is taken over once its lease runs out; a live
owner keeps it by renewing. End to end, gateways in front of one simulator start exactly one load
for ten concurrent cold requests spread over them, and share its failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import Gateway, serve_gateway
from gateway.config.settings import Config
from gateway.models.shared import Claim
from gateway.simulator import SimModel, Simulator
from gateway.state.loads import RedisLoads
from tests.gateway.replicas import replicas as shared_replicas

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"


def replicas(url: str, count: int = 2, *, lease_s: float = 5.0, running: bool = True) -> AbstractAsyncContextManager[list[RedisLoads]]:
    """``count`` replicas' RedisLoads on the same Redis (each its own client, as separate processes have)."""
    return shared_replicas(url, lambda state: RedisLoads(state, scope="lmstudio"), count, lease_s=lease_s, running=running)


async def claim(loads: RedisLoads, following: str | None = None) -> Claim:
    answer = await loads.claim(MODEL, expected_s=12.0, following=following)
    assert answer is not None
    return answer


async def test_one_replica_claims_the_load_and_the_others_follow_it_to_its_outcome(redis_server):
    async with replicas(redis_server.url, 3) as (a, b, c):
        mine = await claim(a)
        assert mine.mine and mine.load.state == "loading"
        for other in (b, c):
            theirs = await claim(other)
            assert not theirs.mine
            assert (theirs.load.state, theirs.load.token, theirs.load.owner) == ("loading", mine.load.token, a.state.owner)
            assert theirs.load.expected_s == 12.0
        # Still loading: following it changes nothing.
        assert not (await claim(b, following=mine.load.token)).mine
        await a.finish(mine, error=None, instance="qwen:2", seconds=3.5)
        outcome = await claim(b, following=mine.load.token)
        assert not outcome.mine
        assert (outcome.load.state, outcome.load.instance, outcome.load.seconds) == ("loaded", "qwen:2", 3.5)
        # A request that follows nothing after the outcome (a cold model again later) claims a new load.
        assert (await claim(c)).mine


async def test_a_failed_load_reaches_its_followers_with_the_upstream_message(redis_server):
    async with replicas(redis_server.url) as (a, b):
        mine = await claim(a)
        await a.finish(mine, error="Engine protocol startup was aborted.", instance=None, seconds=None)
        outcome = await claim(b, following=mine.load.token)
        assert (outcome.load.state, outcome.load.error) == ("failed", "Engine protocol startup was aborted.")


async def test_a_dead_owners_claim_is_taken_over_once_its_lease_runs_out(redis_server):
    lease_s = 0.3
    async with replicas(redis_server.url, 1, lease_s=lease_s, running=False) as (dead,), replicas(
        redis_server.url, 1, lease_s=lease_s
    ) as (alive,):
        lost = await claim(dead)  # its process never renews: as if killed with SIGKILL
        assert not (await claim(alive)).mine
        with anyio.fail_after(5):
            while not (taken := await claim(alive, following=lost.load.token)).mine:
                await anyio.sleep(0.05)
        assert taken.load.owner == alive.state.owner


async def test_a_live_owner_keeps_its_claim_past_the_lease_by_renewing_it(redis_server):
    lease_s = 0.3
    async with replicas(redis_server.url, lease_s=lease_s) as (a, b):
        mine = await claim(a)
        await anyio.sleep(lease_s * 3)  # three lease periods: renewed by a's heartbeat meanwhile
        theirs = await claim(b, following=mine.load.token)
        assert not theirs.mine and theirs.load.token == mine.load.token


async def test_other_replicas_see_a_load_under_way_and_stop_seeing_it_when_it_ends(redis_server):
    async with replicas(redis_server.url) as (a, b):
        mine = await claim(a)
        await b.observe()
        assert list(b.elsewhere()) == [MODEL] and b.elsewhere()[MODEL].owner == a.state.owner
        await a.observe()
        assert a.elsewhere() == {}  # its own load is not "elsewhere"
        await a.finish(mine, error=None, instance=None, seconds=1.0)
        await b.observe()
        assert b.elsewhere() == {}


async def test_without_redis_the_claim_says_decide_alone(redis_server):
    async with replicas(redis_server.url, 1) as (a,):
        redis_server.stop()
        assert await a.claim(MODEL, expected_s=None) is None
        assert await a.claim(MODEL, expected_s=None) is None  # known down: at once


# -- whole gateways in front of one simulator --------------------------------------------------------


def gateway_config(sim_url: str, redis_url: str, **sections: Any) -> Config:
    document: dict[str, Any] = {
        "upstream": {"url": sim_url},
        "state": {"redis_url": redis_url, "lease_s": 1.0},
        "models": {"heartbeat_s": 0.1},
        **sections,
    }
    return Config.model_validate(document)


@asynccontextmanager
async def gateways(sim_url: str, redis_url: str, count: int, **sections: Any) -> AsyncIterator[list[tuple[str, Gateway]]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serve_gateway(gateway_config(sim_url, redis_url, **sections))) for _ in range(count)]


def chat() -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}


async def spread(urls: list[str], count: int) -> list[httpx.Response]:
    responses: list[httpx.Response] = []
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client, anyio.create_task_group() as tg:

        async def one(url: str) -> None:
            responses.append(await client.post(url + "/v1/chat/completions", json=chat()))

        for number in range(count):
            tg.start_soon(one, urls[number % len(urls)])
    return responses


async def test_ten_cold_requests_over_three_gateways_load_the_model_once(redis_server):
    model = SimModel(id=MODEL, load_delay_s=0.5, tokens_per_second=float("inf"), ttft_base_s=0.0)
    async with Simulator(models=[model]) as sim, gateways(sim.url, redis_server.url, 3) as served:
        responses = await spread([url for url, _ in served], 10)
        assert [r.status_code for r in responses] == [200] * 10
        assert sim.counters.loads_started == 1
        states = sorted(r.headers["x-lmgate-model-state"] for r in responses)
        assert set(states) == {"cold"}  # every one of them waited for the one load
        # Every gateway knows the model is loaded, whichever one loaded it.
        for _, gateway in served:
            assert gateway.models.registry.state(MODEL) == "loaded"


async def test_a_load_that_fails_on_one_gateway_fails_the_requests_of_all_with_its_message(redis_server):
    model = SimModel(id=MODEL, load_delay_s=0.3, tokens_per_second=float("inf"), ttft_base_s=0.0)
    async with Simulator(models=[model]) as sim, gateways(sim.url, redis_server.url, 2) as served:
        sim.inject_fault("load_failure", message="Engine protocol startup was aborted.")
        responses = await spread([url for url, _ in served], 6)
        assert sim.counters.loads_started == 1
        assert [r.status_code for r in responses] == [502] * 6
        for response in responses:
            error = response.json()["error"]
            assert error["code"] == "model_load_failed" and "Engine protocol startup was aborted." in error["message"]


async def test_every_gateway_lists_a_load_under_way_on_another(redis_server):
    model = SimModel(id=MODEL, load_delay_s=30.0, tokens_per_second=float("inf"), ttft_base_s=0.0)
    async with (
        Simulator(models=[model]) as sim,
        gateways(sim.url, redis_server.url, 2) as ((a_url, _), (b_url, b)),
        httpx.AsyncClient(timeout=30.0, trust_env=False) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: client.post(a_url + "/lmgate/models/" + MODEL + "/load"))
        await sim.counters.wait_for(lambda c: c.loads_started == 1)
        loads = b.models.loader.shared
        assert loads is not None
        with anyio.fail_after(5):  # b reads the shared loads on its heartbeat (lease_s / 3)
            while MODEL not in loads.elsewhere():
                await anyio.sleep(0.05)
        listing = (await client.get(b_url + "/lmgate/models")).json()
        entry = next(m for m in listing["models"] if m["id"] == MODEL)
        assert entry["state"] == "loading" and entry["loading"]["replica"]
        assert listing["loads"]["in_progress"] == [MODEL]
        tg.cancel_scope.cancel()
