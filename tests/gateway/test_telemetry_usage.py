"""Token usage on streams: lmgate asks LM Studio for it and the client never sees the difference."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import build_app
from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from gateway.simulator import RealClock, SimModel, Simulator
from gateway.telemetry import RequestOutcome

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
CHAT = "/v1/chat/completions"


class FixedWall(RealClock):
    """Real time for pacing, a fixed wall clock so two answers to one request are byte-identical."""

    def wall(self) -> float:
        return 1_750_000_000.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    model = SimModel(id=MODEL, loaded=True, tokens_per_second=2000.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model], clock=FixedWall()) as simulator:
        yield simulator


async def stream_bytes(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> bytes:
    async with client.stream("POST", url + CHAT, json=body) as response:
        assert response.status_code == 200
        return await response.aread()


@pytest.mark.parametrize("client_asks", [False, True], ids=["usage-added-and-removed", "client-asked-for-usage"])
async def test_the_clients_stream_is_byte_identical_to_lm_studios(sim, client_asks):
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    app = build_app(Config.model_validate({"upstream": {"url": sim.url}}))
    ended_send, ended = anyio.create_memory_object_stream[RequestOutcome](4)
    app.telemetry.on_request_end.append(lambda record, outcome: ended_send.send_nowait(outcome))
    with ended_send, ended:
        async with serve_in_background(app) as server, httpx.AsyncClient(timeout=10, trust_env=False) as client:
            direct = await stream_bytes(client, sim.url, body)
            through = await stream_bytes(client, server.url, body)
            with anyio.fail_after(5):
                outcome = await ended.receive()
        await app.aclose()
    assert through == direct
    assert (b'"choices":[],"usage"' in direct) is client_asks
    assert outcome.tokens_out == 24 and outcome.tokens_in is not None and outcome.tokens_in > 0


@pytest.mark.parametrize("client_asks", [False, True], ids=["lmgate-asked", "client-asked"])
async def test_a_stream_without_usage_gets_counted_tokens_marked_as_counted(sim, client_asks):
    # The upstream ignores stream_options.include_usage (llama-cpp-python's server does): telemetry
    # counts the streamed tokens itself and says so; the client's bytes are untouched.
    sim.settings.stream_usage = False
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    app = build_app(Config.model_validate({"upstream": {"url": sim.url}}))
    ended_send, ended = anyio.create_memory_object_stream[tuple[Any, RequestOutcome]](4)
    app.telemetry.on_request_end.append(lambda record, outcome: ended_send.send_nowait((record, outcome)))
    with ended_send, ended:
        async with serve_in_background(app) as server, httpx.AsyncClient(timeout=10, trust_env=False) as client:
            direct = await stream_bytes(client, sim.url, body)
            through = await stream_bytes(client, server.url, body)
            with anyio.fail_after(5):
                record, outcome = await ended.receive()
            scrape = (await client.get(server.url + "/metrics")).text
        await app.aclose()
    assert through == direct and b'"usage"' not in direct
    # One token per content frame; the prompt estimated at four characters a token.
    assert outcome.tokens_out == 24 and outcome.tokens_in == 4
    assert record.usage_source("output") == "counted" and record.usage_source("input") == "estimated"
    assert 'lmgate_token_usage_counted_total{gen_ai_token_type="output",source="counted"} 1.0' in scrape
    assert 'lmgate_token_usage_counted_total{gen_ai_token_type="input",source="estimated"} 1.0' in scrape


async def test_a_stream_cut_before_its_end_gets_no_counted_usage(sim):
    sim.settings.stream_usage = False
    sim.inject_fault("crash_mid_stream", after_tokens=5)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    app = build_app(Config.model_validate({"upstream": {"url": sim.url}, "retry": {"enabled": False}}))
    ended_send, ended = anyio.create_memory_object_stream[tuple[Any, RequestOutcome]](4)
    app.telemetry.on_request_end.append(lambda record, outcome: ended_send.send_nowait((record, outcome)))
    with ended_send, ended:
        async with serve_in_background(app) as server, httpx.AsyncClient(timeout=10, trust_env=False) as client:
            async with client.stream("POST", server.url + CHAT, json=body) as response:
                await response.aread()
            with anyio.fail_after(5):
                record, outcome = await ended.receive()
        await app.aclose()
    assert outcome.category == "stream_cut"
    assert outcome.tokens_out is None and record.usage_counted is None  # a cut answer is not counted
