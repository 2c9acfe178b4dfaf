"""The whole gateway (``build_app``) in front of the LM Studio simulator, over real sockets.

Covers what the foundation and middleware issues ask to see end to end: streaming through the full
stack with httpx and the official openai SDK, cancellation reaching LM Studio in each phase, the
assembled non-streaming body matching LM Studio's own, and the resilience layers against real
upstream failures.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import openai
import pytest

from gateway.app import serve_gateway
from gateway.config.settings import Config
from gateway.simulator import FakeClock, SimModel, Simulator
from gateway.simulator.testing import unstamped

pytestmark = pytest.mark.anyio

WARM = "qwen2.5-7b-instruct"
# LM Studio must notice a client that left within this budget (issue 3), in every phase.
CANCEL_BUDGET_S = 0.25
MESSAGES = [{"role": "user", "content": "Tell me about gateways."}]


def gateway_config(upstream_url: str, **sections: dict[str, Any]) -> Config:
    document: dict[str, Any] = {"upstream": {"url": upstream_url}, "retry": {"backoff_base_s": 0.01}}
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    return Config.model_validate(document)


@asynccontextmanager
async def running_gateway(upstream_url: str, **sections: dict[str, Any]) -> AsyncIterator[str]:
    async with serve_gateway(gateway_config(upstream_url, **sections)) as (url, _):
        yield url


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    models = [
        SimModel(id=WARM, loaded=True, tokens_per_second=200.0, ttft_base_s=0.01, ttft_per_prompt_token_s=0.0),
        SimModel(id="slow-7b", loaded=True, tokens_per_second=5.0, ttft_base_s=0.01, ttft_per_prompt_token_s=0.0),
        SimModel(id="prefill-7b", loaded=True, ttft_base_s=0.6, ttft_per_prompt_token_s=0.0),
        SimModel(id="cold-8b", load_delay_s=1.5, tokens_per_second=200.0),
    ]
    async with Simulator(models=models, control=True) as simulator:
        yield simulator


@pytest.fixture
async def gateway(sim: Simulator) -> AsyncIterator[str]:
    async with running_gateway(sim.url) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


def chat(model: str = WARM, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


# --- streaming and the official SDK -------------------------------------------------------------


async def test_a_stream_through_the_full_stack_is_byte_identical_to_lm_studios(sim, gateway, client):
    direct = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=True))
    through = await client.post(gateway + "/v1/chat/completions", json=chat(stream=True))
    assert through.status_code == 200
    assert unstamped(through.content) == unstamped(direct.content)
    assert through.content.endswith(b"data: [DONE]\n\n")
    assert through.headers["x-accel-buffering"] == "no"


async def test_the_openai_sdk_streams_and_parses_through_lmgate(sim, gateway):
    sdk = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(model=WARM, messages=MESSAGES, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        reply = await sdk.chat.completions.create(model=WARM, messages=MESSAGES)
    finally:
        await sdk.close()
    assert text and text == reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


async def test_the_openai_sdk_sees_lm_studio_errors_as_api_errors(gateway):
    sdk = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)
    finally:
        await sdk.close()
    assert caught.value.code == "model_not_found"


async def test_an_sdk_client_that_stops_reading_cancels_generation(sim, gateway):
    sdk = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(model="slow-7b", messages=MESSAGES, stream=True)
        async for _ in stream:
            break
        await stream.close()
        with anyio.fail_after(3):
            await sim.wait_for(lambda c: c.generations_cancelled == 1)
    finally:
        await sdk.close()
    assert sim.counters.generations_completed == 0


# --- cancellation in each phase ------------------------------------------------------------------


async def leave_after(client: httpx.AsyncClient, url: str, body: dict[str, Any], ready: Any) -> float:
    """Stream ``body``, wait until ``ready()`` says the phase is reached, then hang up; return when."""
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        await ready(response)
        left_at = time.monotonic()
    return left_at


async def test_leaving_mid_stream_cancels_generation_within_budget(sim, gateway, client, caplog):
    caplog.set_level("WARNING", logger="asyncio")

    async def after_first_chunk(response: httpx.Response) -> None:
        await anext(response.aiter_raw())

    left_at = await leave_after(client, gateway + "/v1/chat/completions", chat("slow-7b", stream=True), after_first_chunk)
    with anyio.fail_after(3):
        await sim.wait_for(lambda c: c.generations_cancelled == 1)
    propagation_s = sim.counters.cancel_times[0] - left_at
    assert propagation_s < CANCEL_BUDGET_S
    assert sim.counters.tokens_before_cancel[0] < 24
    # The outermost layer stops writing to the departed client; the disconnect still reaches the proxy.
    assert not [r for r in caplog.records if r.name == "asyncio" and "socket.send()" in r.getMessage()]


async def test_leaving_during_prefill_is_noticed_at_once_and_stops_after_the_prefill(sim, gateway, client):
    async def prefill_started(response: httpx.Response) -> None:
        await sim.wait_for(lambda c: c.generations_started == 1)

    left_at = await leave_after(client, gateway + "/v1/chat/completions", chat("prefill-7b", stream=True), prefill_started)
    with anyio.fail_after(3):
        await sim.wait_for(lambda c: c.generations_cancelled == 1)
    propagation_s = sim.counters.cancel_times[0] - left_at
    assert propagation_s < CANCEL_BUDGET_S
    assert sim.counters.tokens_before_cancel == [0]


async def test_leaving_during_a_model_load_ends_the_request_but_not_the_load(sim, gateway, client):
    # lmgate loads cold models itself (single flight), so during the load there is no upstream
    # request to cancel: the departed request must simply never reach LM Studio, and the load
    # must finish for whoever comes next.
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: client.post(gateway + "/v1/chat/completions", json=chat("cold-8b", stream=True)))
        await sim.wait_for(lambda c: c.loading == 1)
        tg.cancel_scope.cancel()  # the client hangs up mid-load
    with anyio.fail_after(5):
        await sim.wait_for(lambda c: c.loads_completed == 1)
    follow_up = await client.post(gateway + "/v1/chat/completions", json=chat("cold-8b"))
    assert follow_up.status_code == 200
    assert sim.counters.loads_started == 1 and sim.counters.loads_aborted == 0
    assert sim.counters.generations_started == 1  # the follow-up's only


async def test_a_non_streaming_client_that_leaves_stops_generation_too(sim, gateway, client):
    # LM Studio would finish a non-streaming completion for nobody; lmgate streams it upstream.
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: client.post(gateway + "/v1/chat/completions", json=chat("slow-7b")))
        await sim.wait_for(lambda c: c.generations_started == 1)
        tg.cancel_scope.cancel()
    with anyio.fail_after(3):
        await sim.wait_for(lambda c: c.generations_cancelled == 1)
    assert sim.counters.generations_completed == 0


# --- non-streaming assembly ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", chat()),
        ("/v1/chat/completions", chat("reasoning-7b", max_tokens=5)),
        ("/v1/completions", {"model": WARM, "prompt": "Once upon a time"}),
    ],
)
async def test_the_assembled_body_matches_lm_studios_non_streaming_body(client, route, body):
    models = [
        SimModel(id=WARM, loaded=True, tokens_per_second=float("inf"), ttft_base_s=0.0, ttft_per_prompt_token_s=0.0),
        SimModel(id="reasoning-7b", loaded=True, tokens_per_second=float("inf"), ttft_base_s=0.0,
                 ttft_per_prompt_token_s=0.0, reasoning_tokens=4),
    ]
    async with Simulator(models=models, clock=FakeClock()) as sim, running_gateway(sim.url) as gateway:
        direct = (await client.post(sim.url + route, json=body)).json()
        assembled = await client.post(gateway + route, json=body)
    assert assembled.status_code == 200
    assert assembled.json() == direct


async def test_the_assembly_switch_sends_non_streaming_requests_unchanged(sim, client):
    async with running_gateway(sim.url, routes={"assemble_non_streaming": False}) as gateway:
        response = await client.post(gateway + "/v1/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"


# --- resilience layers against real upstream failures ----------------------------------------------


async def test_a_retry_succeeds_after_two_503s(sim, gateway, client):
    sim.inject_fault("http_error", count=2, status=503, message="busy")
    response = await client.post(gateway + "/v1/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.headers["x-lmgate-attempts"] == "3"
    assert sim.counters.faults_applied == 2 and sim.counters.generations_completed == 1


async def test_a_body_over_the_retry_body_limit_gets_one_attempt_through_the_full_stack(sim, client):
    """Outer layers read the body first (with limits.body_bytes); retry still applies its own limit."""
    sim.inject_fault("http_error", count=3, status=503, message="busy")
    async with running_gateway(sim.url, retry={"body_limit_bytes": 16}) as gateway:
        response = await client.post(gateway + "/v1/chat/completions", json=chat())
    assert response.status_code == 503
    assert response.headers["x-lmgate-attempts"] == "1"
    assert sim.counters.faults_applied == 1


async def test_twenty_requests_through_limit_4_and_queue_8(client):
    clock = FakeClock()
    model = SimModel(id=WARM, loaded=True, parallel=8, tokens_per_second=float("inf"), ttft_base_s=1.0,
                     ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model], clock=clock) as sim, running_gateway(
        sim.url, concurrency={"limit": 4, "max_queue": 8, "max_wait_s": 60}
    ) as gateway:
        results: list[httpx.Response] = []
        eight_shed = anyio.Event()

        async def one() -> None:
            results.append(await client.post(gateway + "/v1/chat/completions", json=chat(stream=True)))
            if sum(r.status_code == 503 for r in results) == 8:
                eight_shed.set()

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
            # Four reach LM Studio and wait on its (fake) clock; eight queue; eight are shed.
            with anyio.fail_after(5):
                await sim.wait_for(lambda c: c.generations_started == 4)
                await eight_shed.wait()
            assert [r.status_code for r in results] == [503] * 8
            assert sim.counters.max_active_generations == 4
            for round_ in range(3):  # 4 + 4 + 4 served in turn as slots free up
                with anyio.fail_after(5):
                    await sim.wait_for(lambda c, n=round_: c.generations_started == 4 * (n + 1))
                clock.advance(1.0)
    served = [r for r in results if r.status_code == 200]
    shed = [r for r in results if r.status_code == 503]
    assert len(served) == 12 and len(shed) == 8
    assert all(r.content.endswith(b"data: [DONE]\n\n") for r in served)
    assert all(r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1 for r in shed)
    assert sim.counters.max_active_generations == 4


async def test_a_concurrency_limit_above_the_old_pool_size_lets_every_stream_reach_lm_studio():
    # With the pool sized apart from the limit (100 connections), streams 101 and up waited inside
    # the HTTP client, outside the queue, its metrics and its Retry-After. The derived pool follows
    # the limit: every admitted stream is generating at LM Studio at once.
    streams = 104
    clock = FakeClock()  # standing still: every generation waits for its first token until advanced
    model = SimModel(id=WARM, loaded=True, parallel=streams, tokens_per_second=float("inf"), ttft_base_s=1.0,
                     ttft_per_prompt_token_s=0.0)
    unbounded = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        Simulator(models=[model], clock=clock) as sim,
        running_gateway(sim.url, concurrency={"limit": streams, "max_queue": 0}) as gateway,
        httpx.AsyncClient(timeout=30.0, trust_env=False, limits=unbounded) as crowd,
    ):
        results: list[httpx.Response] = []

        async def one() -> None:
            results.append(await crowd.post(gateway + "/v1/chat/completions", json=chat(stream=True)))

        async with anyio.create_task_group() as tg:
            for _ in range(streams):
                tg.start_soon(one)
            await sim.wait_for(lambda c: c.active_generations == streams, timeout=10)
            clock.advance(1.0)
    assert sim.counters.max_active_generations == streams
    assert [r.status_code for r in results] == [200] * streams
    assert all(r.content.endswith(b"data: [DONE]\n\n") for r in results)


async def test_a_wait_for_an_upstream_connection_is_bounded_and_refused_like_the_queue(client):
    # Without a concurrency limit an explicit pool is the only bound. A request waiting for one of
    # its connections waits at most concurrency.max_wait_s, then is refused like a full queue
    # (503 overloaded, Retry-After): lmgate's own overload, not an upstream timeout to retry or
    # to count against the upstream's circuit.
    clock = FakeClock()
    model = SimModel(id=WARM, loaded=True, tokens_per_second=float("inf"), ttft_base_s=1.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model], clock=clock) as sim, running_gateway(
        sim.url, concurrency={"enabled": False, "max_wait_s": 0.2}, upstream={"pool": {"max_connections": 1}}
    ) as gateway, anyio.create_task_group() as tg:
        first: list[httpx.Response] = []

        async def holds_the_only_connection() -> None:
            first.append(await client.post(gateway + "/v1/chat/completions", json=chat(stream=True)))

        tg.start_soon(holds_the_only_connection)
        await sim.wait_for(lambda c: c.active_generations == 1)
        with anyio.fail_after(5):
            refused = await client.post(gateway + "/v1/chat/completions", json=chat(stream=True))
        clock.advance(1.0)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert "upstream.pool.max_connections" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert first[0].content.endswith(b"data: [DONE]\n\n") and sim.counters.requests == 1


async def test_the_breaker_opens_sheds_half_opens_and_closes(sim, client):
    async with running_gateway(
        sim.url, retry={"enabled": False}, circuit_breaker={"failure_threshold": 3, "reset_timeout_s": 0.3}
    ) as gateway:
        sim.inject_fault("http_error", count=3, status=500, message="engine down")
        statuses = [(await client.post(gateway + "/v1/chat/completions", json=chat())).status_code for _ in range(3)]
        assert statuses == [500, 500, 500]
        contacted = sim.counters.requests
        shed = await client.post(gateway + "/v1/chat/completions", json=chat())
        assert shed.status_code == 503 and shed.json()["error"]["code"] == "circuit_open"
        assert "retry-after" in shed.headers
        assert sim.counters.requests == contacted  # no upstream contact while open
        await anyio.sleep(0.35)  # the cool-down itself is what is under test
        probe = await client.post(gateway + "/v1/chat/completions", json=chat())
        assert probe.status_code == 200
        after = await client.post(gateway + "/v1/chat/completions", json=chat())
        assert after.status_code == 200


async def test_an_idle_timeout_mid_stream_ends_with_an_error_frame_and_cancels_lm_studio(sim, client):
    # slow-7b sends a token every 0.2 s: after the first one, a silence longer than idle_s.
    async with running_gateway(sim.url, timeouts={"idle_s": 0.1}) as gateway:
        response = await client.post(gateway + "/v1/chat/completions", json=chat("slow-7b", stream=True))
        with anyio.fail_after(3):
            await sim.wait_for(lambda c: c.disconnects == 1)
    assert response.status_code == 200
    frames = response.content.split(b"\n\n")
    assert frames[0].startswith(b"data: {")  # a token went out first: this was mid-stream
    error = [f for f in frames if f.startswith(b"event: error")]
    assert len(error) == 1 and json.loads(error[0].split(b"data: ", 1)[1])["error"]["code"] == "timeout"
    assert b"idle deadline" in error[0] and b"[DONE]" not in response.content


async def test_a_frame_trickling_in_byte_by_byte_is_no_first_token(sim, client):
    # Half a frame is held back (whole frames only), so it neither reaches the client nor counts
    # as the first token: the first-token deadline ends the stream, with nothing half-sent.
    sim.inject_fault("slow_bytes", delay_s=5.0)  # first byte, then silence
    async with running_gateway(sim.url, timeouts={"first_token_s": 0.3}) as gateway:
        response = await client.post(gateway + "/v1/chat/completions", json=chat(stream=True))
        with anyio.fail_after(3):
            await sim.wait_for(lambda c: c.disconnects == 1)
    assert response.status_code == 200
    error = json.loads(response.content.split(b"data: ", 1)[1])["error"]
    assert response.content.startswith(b"event: error") and error["code"] == "timeout"
    assert "first-token deadline" in error["message"]


async def test_a_first_token_timeout_is_a_504_before_anything_was_sent(sim, client):
    sim.inject_fault("hang_before_headers")
    async with running_gateway(sim.url, timeouts={"first_token_s": 0.3}, retry={"enabled": False}) as gateway:
        response = await client.post(gateway + "/v1/chat/completions", json=chat(stream=True))
        with anyio.fail_after(3):
            await sim.wait_for(lambda c: c.disconnects == 1)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert response.headers["x-lmgate-error"] == "timeout"


async def test_lmgates_own_routes_answer_while_the_upstream_is_down(client):
    async with running_gateway("http://127.0.0.1:9") as gateway:
        assert (await client.get(gateway + "/healthz")).status_code == 200
        response = await client.post(gateway + "/v1/chat/completions", json=chat())
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
