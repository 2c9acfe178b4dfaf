"""gateway/state/listings.py against a real redis-server, then whole gateways sharing one upstream listing.

Two or three ``SharedState`` clients stand for replicas: one takes the lease and publishes the
listing, the others take its copy; a lease whose holder died runs out. End to end, three gateways in
front of one simulator ask it for its listing about once per ``models.refresh_s`` together, a model
loaded behind their backs is seen by a replica that never asked, and without Redis each gateway
asks for itself.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import Gateway, serve_gateway
from gateway.config.settings import Config
from gateway.models.shared import SharedListing
from gateway.models.upstream import Listed, ModelFacts
from gateway.simulator import SimModel, Simulator
from gateway.state.listings import RedisListings, decode, encode
from tests.gateway.replicas import replicas as shared_replicas

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
OTHER = "llama-3.2-1b-instruct"
LISTING = "GET /api/v1/models"

LISTED = SharedListing(
    models=(
        Listed(MODEL, "llm", True, (MODEL, f"{MODEL}:2"), 4_683_073_952, ModelFacts("qwen2", "Q4_K_M", "gguf", 4096)),
        Listed(OTHER, "llm", False, (), None, None),
    ),
    api="api/v1",
    took_s=0.004,
)


def replicas(url: str, count: int = 2, *, refresh_s: float = 5.0) -> AbstractAsyncContextManager[list[RedisListings]]:
    return shared_replicas(url, lambda state: RedisListings(state, scope="lmstudio", refresh_s=refresh_s), count)


def test_a_listing_survives_the_trip_through_json():
    copy = decode(encode(LISTED), age_s=1.5)
    assert copy is not None
    assert copy.models == LISTED.models and copy.api == "api/v1" and copy.took_s == 0.004 and copy.age_s == 1.5
    failed = SharedListing(models=(), api=None, error="The upstream could not be reached: refused", unreachable=True)
    assert decode(encode(failed), age_s=0.0) == failed
    for damaged in (
        b"{",
        b'{"v": 2}',
        b'{"v": 1, "api": "v9", "error": null, "unreachable": false, "took_s": 0, "models": []}',
    ):
        assert decode(damaged, age_s=0.0) is None


async def test_one_replica_takes_the_lease_and_the_others_take_its_copy(redis_server):
    async with replicas(redis_server.url, 3) as (a, b, c):
        first = await a.turn(fresh_s=5.0)
        assert first is not None and first.mine and first.copy is None
        waiting = await b.turn(fresh_s=5.0)  # a reads the listing now, and there is no copy yet
        assert waiting is not None and not waiting.mine and waiting.copy is None
        await a.publish(LISTED, turn=first)
        for other in (b, c):
            taken = await other.turn(fresh_s=5.0)
            assert taken is not None and not taken.mine
            assert taken.copy is not None and taken.copy.models == LISTED.models and taken.copy.age_s < 5.0


async def test_a_stale_copy_goes_to_one_reader_and_stays_usable_for_the_others(redis_server):
    async with replicas(redis_server.url, 2) as (a, b):
        first = await a.turn(fresh_s=5.0)
        assert first is not None
        await a.publish(LISTED, turn=first)  # gives the lease back
        await anyio.sleep(0.02)
        # Older than a refresh period of 10 ms: b reads it anew, a keeps the older copy meanwhile.
        again = await b.turn(fresh_s=0.01)
        assert again is not None and again.mine and again.copy is not None
        meanwhile = await a.turn(fresh_s=0.01)
        assert meanwhile is not None and not meanwhile.mine
        assert meanwhile.copy is not None and meanwhile.copy.models == LISTED.models and meanwhile.copy.age_s >= 0.01


async def test_a_lease_whose_holder_died_runs_out(redis_server):
    refresh_s = 0.2
    async with replicas(redis_server.url, 2, refresh_s=refresh_s) as (dead, alive):
        lost = await dead.turn(fresh_s=refresh_s)
        assert lost is not None and lost.mine  # and it never publishes: as if killed
        with anyio.fail_after(5):
            while not (taken := await alive.turn(fresh_s=refresh_s)) or not taken.mine:
                await anyio.sleep(0.02)


async def test_without_redis_the_turn_says_read_it_alone(redis_server):
    async with replicas(redis_server.url, 1) as (a,):
        redis_server.stop()
        assert await a.turn(fresh_s=5.0) is None
        await a.publish(LISTED, turn=None)  # does not raise
        assert a.published == 0


# -- whole gateways in front of one simulator --------------------------------------------------------


def gateway_config(sim_url: str, redis_url: str, *, refresh_s: float) -> Config:
    document: dict[str, Any] = {
        "upstream": {"url": sim_url},
        "state": {"redis_url": redis_url, "lease_s": 1.0, "timeout_ms": 1000},
        "models": {"refresh_s": refresh_s},
    }
    return Config.model_validate(document)


@asynccontextmanager
async def gateways(
    sim_url: str, redis_url: str, count: int, *, refresh_s: float
) -> AsyncIterator[list[tuple[str, Gateway]]]:
    async with AsyncExitStack() as stack:
        config = gateway_config(sim_url, redis_url, refresh_s=refresh_s)
        yield [await stack.enter_async_context(serve_gateway(config)) for _ in range(count)]


def listings(sim: Simulator) -> int:
    return sim.counters.routes.get(LISTING, 0)


def sim_models() -> list[SimModel]:
    fast = {"load_delay_s": 0.05, "tokens_per_second": float("inf"), "ttft_base_s": 0.0}
    return [SimModel(id=MODEL, loaded=True, **fast), SimModel(id=OTHER, **fast)]


async def one_each(client: httpx.AsyncClient, urls: list[str]) -> list[int]:
    """One chat request to each gateway, at the same time; their statuses."""
    statuses: list[int] = []
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    async with anyio.create_task_group() as tg:
        for url in urls:

            async def one(url: str = url) -> None:
                statuses.append((await client.post(url + "/v1/chat/completions", json=body)).status_code)

            tg.start_soon(one)
    return statuses


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def test_three_gateways_ask_for_the_listing_about_once_per_refresh_period(redis_server):
    refresh_s = 0.5
    async with (
        Simulator(models=sim_models()) as sim,
        gateways(sim.url, redis_server.url, 3, refresh_s=refresh_s) as served,
        httpx.AsyncClient(timeout=30.0, trust_env=False) as client,
    ):
        urls = [url for url, _ in served]
        before = listings(sim)
        started = anyio.current_time()
        statuses: list[int] = []
        while anyio.current_time() - started < 5 * refresh_s:  # requests on all three through five periods
            statuses += await one_each(client, urls)
            await anyio.sleep(0.05)  # pacing, not synchronisation: a steady trickle of requests
        periods = math.ceil((anyio.current_time() - started) / refresh_s)
        asked = listings(sim) - before
        assert set(statuses) == {200}
        # Alone, each gateway would ask once per period (about 3 * periods); together, one does.
        assert 1 <= asked <= periods + 2, (asked, periods)
        published = [gateway.models.registry.shared.published for _, gateway in served]  # type: ignore[union-attr]
        assert sum(published) == asked


async def test_a_model_loaded_behind_their_backs_is_seen_by_a_replica_that_never_asked(redis_server):
    refresh_s = 0.3
    async with (
        Simulator(models=sim_models()) as sim,
        gateways(sim.url, redis_server.url, 2, refresh_s=refresh_s) as ((_, a), (_, b)),
    ):
        await a.models.registry.refresh()
        assert listings(sim) == 1 and a.models.registry.state(OTHER) == "not-loaded"
        await sim.load_model(OTHER)  # as `lms load` does, or a user in LM Studio's window
        await eventually(lambda: not a.models.registry.fresh)
        await a.models.registry.refresh()  # a's turn: it asks and publishes
        assert listings(sim) == 2 and a.models.registry.state(OTHER) == "loaded"
        await b.models.registry.refresh()
        assert listings(sim) == 2  # b did not ask
        registry = b.models.registry
        assert registry.state(OTHER) == "loaded" and registry.refresh_error is None and registry.fresh
        assert registry.facts(MODEL) is not None and registry.facts(MODEL).context_length  # type: ignore[union-attr]
        assert b.models.upstream.api == "api/v1"  # its loads go through LM Studio's REST load, as a's would


async def test_without_redis_each_gateway_reads_the_listing_itself_and_shares_again_once_it_is_back(redis_server):
    refresh_s = 0.3
    async with (
        Simulator(models=sim_models()) as sim,
        gateways(sim.url, redis_server.url, 3, refresh_s=refresh_s) as served,
        httpx.AsyncClient(timeout=30.0, trust_env=False) as client,
    ):
        urls = [url for url, _ in served]
        registries = [gateway.models.registry for _, gateway in served]

        async def round_of_requests() -> int:
            await eventually(lambda: not any(registry.fresh for registry in registries))
            before = listings(sim)
            assert await one_each(client, urls) == [200] * 3
            return listings(sim) - before

        assert await round_of_requests() == 1  # shared: one asks, the two others wait for its copy
        redis_server.stop()
        assert await round_of_requests() == 3  # alone: each asks for itself
        assert all(registry.refresh_error is None for registry in registries)
        redis_server.start()  # empty: no copy, no lease
        states = [gateway.collaborators.state for _, gateway in served]
        await eventually(lambda: all(state is not None and state.available for state in states))
        assert await round_of_requests() == 1


async def test_a_copy_read_before_this_replicas_own_load_ended_does_not_unload_it(redis_server):
    async with (
        Simulator(models=sim_models()) as sim,
        gateways(sim.url, redis_server.url, 1, refresh_s=0.3) as ((_, b),),
    ):
        registry, shared = b.models.registry, b.models.registry.shared
        assert isinstance(shared, RedisListings)
        job = await b.models.loader.load(OTHER)
        assert job.error is None and registry.state(OTHER) == "loaded"
        # Another replica's listing, read from the upstream before b's load ended (it took 10 s).
        behind = SharedListing(models=(Listed(MODEL, "llm", True, (MODEL,)), Listed(OTHER, "llm", False)), api="api/v1")
        await shared.publish(SharedListing(behind.models, behind.api, took_s=10.0), turn=None)
        await eventually(lambda: not registry.fresh)
        await registry.refresh()
        assert registry.state(OTHER) == "loaded"
        # One read after the load ended says what happened since: the model was unloaded.
        await shared.publish(behind, turn=None)
        await eventually(lambda: not registry.fresh)
        await registry.refresh()
        assert registry.state(OTHER) == "not-loaded"
