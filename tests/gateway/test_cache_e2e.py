"""The response cache through the whole gateway, in front of the simulator, over real sockets.

What only the full stack shows: a hit never reaches LM Studio, never loads a model and never takes
a concurrency slot (the cache sits outside those layers); a streamed hit parses like the original
stream in the official SDK; a stream the upstream cut is not stored; hits and misses reach
``/metrics``; ``EVAL_CACHE_SIZE`` sizes the cache (and turns it on).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import openai
import pytest

from gateway.app import serve_gateway
from gateway.config.settings import Config, load_config
from gateway.simulator import SimModel, Simulator
from gateway.simulator.testing import BackgroundStream, parse_sse

pytestmark = pytest.mark.anyio

WARM = "qwen2.5-7b-instruct"
SLOW = "slow-7b"
COLD = "cold-8b"
CHAT = "/v1/chat/completions"


def chat(model: str = WARM, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, **extra}


@asynccontextmanager
async def cached_gateway(sim: Simulator, **sections: Any) -> AsyncIterator[str]:
    document = {"upstream": {"url": sim.url}, "cache": {"enabled": True}, "retry": {"enabled": False}, **sections}
    async with serve_gateway(Config.model_validate(document)) as (url, _):
        yield url


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    models = [
        SimModel(id=WARM, loaded=True, tokens_per_second=500.0, ttft_base_s=0.01),
        SimModel(id=SLOW, loaded=True, tokens_per_second=4.0, ttft_base_s=0.01),
        SimModel(id=COLD, load_delay_s=0.3, tokens_per_second=500.0, ttft_base_s=0.01),
    ]
    async with Simulator(models=models) as simulator:
        yield simulator


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


async def test_streamed_hit_replays_the_stream_without_reaching_lm_studio(sim: Simulator, client: httpx.AsyncClient) -> None:
    async with cached_gateway(sim) as url:
        first = await client.post(url + CHAT, json=chat(stream=True))
        requests = sim.counters.requests
        second = await client.post(url + CHAT, json=chat(stream=True))
        sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        async with sdk:
            stream = await sdk.chat.completions.create(model=WARM, messages=chat()["messages"], temperature=0, stream=True)
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert (first.headers["x-lmgate-cache"], second.headers["x-lmgate-cache"]) == ("miss", "hit")
    assert sim.counters.requests == requests  # the hits (httpx and the SDK) never reached the simulator
    assert [f.data for f in parse_sse(second.content)] == [f.data for f in parse_sse(first.content)]
    assert second.headers["content-type"].startswith("text/event-stream") and second.headers["x-request-id"]
    original = "".join(f.json()["choices"][0]["delta"].get("content") or "" for f in parse_sse(first.content)[:-1]
                       if f.json().get("choices"))
    assert text == original and text


async def test_hit_needs_no_model_load_and_no_concurrency_slot(sim: Simulator, client: httpx.AsyncClient) -> None:
    async with cached_gateway(sim, concurrency={"limit": 1, "max_queue": 0}) as url:
        assert (await client.post(url + CHAT, json=chat(COLD))).headers["x-lmgate-cache"] == "miss"
        await sim.unload_model(COLD)
        loads = sim.counters.loads_started
        async with anyio.create_task_group() as tg:
            busy = BackgroundStream(client, url + CHAT, chat(SLOW, temperature=0.5, stream=True))
            tg.start_soon(busy.run)
            await busy.wait_frames(1)  # the one slot is taken
            refused = await client.post(url + CHAT, json=chat(WARM, temperature=0.5))
            hit = await client.post(url + CHAT, json=chat(COLD))
            busy.hang_up()
    assert refused.status_code == 503 and refused.headers["x-lmgate-error"] == "overloaded"
    assert hit.status_code == 200 and hit.headers["x-lmgate-cache"] == "hit"
    assert sim.counters.loads_started == loads and COLD not in sim.counters.instances


async def test_a_cut_stream_is_not_stored_and_the_next_answer_is(sim: Simulator, client: httpx.AsyncClient) -> None:
    async with cached_gateway(sim) as url:
        sim.inject_fault("crash_mid_stream", after_tokens=2)
        cut = await client.post(url + CHAT, json=chat(stream=True))
        answers = [await client.post(url + CHAT, json=chat(stream=True)) for _ in range(2)]
        metrics = (await client.get(url + "/metrics")).text
    assert cut.headers["x-lmgate-cache"] == "miss" and parse_sse(cut.content)[-1].event == "error"
    assert [a.headers["x-lmgate-cache"] for a in answers] == ["miss", "hit"]
    assert parse_sse(answers[1].content)[-1].data == "[DONE]"
    assert 'lmgate_cache_requests_total{result="miss"} 2.0' in metrics
    assert 'lmgate_cache_requests_total{result="hit"} 1.0' in metrics
    assert "lmgate_cache_entries 1.0" in metrics


async def test_no_cache_from_the_client_goes_to_lm_studio(sim: Simulator, client: httpx.AsyncClient) -> None:
    async with cached_gateway(sim) as url:
        await client.post(url + CHAT, json=chat())
        requests = sim.counters.requests
        fresh = await client.post(url + CHAT, json=chat(), headers={"cache-control": "no-cache"})
    assert fresh.headers["x-lmgate-cache"] == "bypass" and sim.counters.requests == requests + 1


def test_eval_cache_size_sets_the_entry_bound() -> None:
    assert load_config(env={"EVAL_CACHE_SIZE": "42"}).cache.max_entries == 42
    assert load_config(env={}).cache.max_entries == 500 and load_config(env={}).cache.enabled is False
