"""Every upstream fault the simulator can inject, end to end through real servers.

For each one: the client gets an OpenAI-shaped error or an SSE error frame (never a stream that
ends like a success), the upstream request is ended, the gateway serves the next request, and no
task, descriptor or upstream connection is left behind (``Leaks``, see conftest.py).
"""

from __future__ import annotations

import json
import socket
from typing import Any

import anyio
import httpx
import openai
import pytest

from gateway.simulator import Simulator
from gateway.simulator.testing import parse_sse, unstamped

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
WARM, SLOW, COLD = "qwen2.5-7b-instruct", "slow-7b", "cold-8b"  # the simulator's models (conftest.py)


def error_frames(raw: bytes) -> list[dict[str, Any]]:
    return [event.json() for event in parse_sse(raw) if event.event == "error"]


def assert_cut_not_finished(response: httpx.Response, code: str | None = None) -> dict[str, Any]:
    """A 200 stream that ends with exactly one error frame and no ``[DONE]``; returns the error."""
    assert response.status_code == 200
    assert b"data: [DONE]" not in response.content
    frames = error_frames(response.content)
    assert len(frames) == 1, response.content[-300:]
    assert response.content.endswith(b"\n\n")
    error = frames[0]["error"]
    if code is not None:
        assert error["code"] == code
    return error


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert response.headers["x-lmgate-error"] == code


async def still_serves(client: httpx.AsyncClient, url: str) -> None:
    response = await client.post(url + CHAT, json={"model": WARM, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert response.status_code == 200 and response.content.endswith(b"data: [DONE]\n\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



# --- the upstream is down, or fails before answering -------------------------------------------


async def test_upstream_down_at_start_up_is_a_502_then_served_once_it_is_up(start_gateway, leaks_of, client, body):
    port = free_port()
    async with start_gateway(f"http://127.0.0.1:{port}") as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        assert (await client.get(gw.url + "/healthz")).status_code == 200
        assert_openai_error(await client.post(gw.url + CHAT, json=body(stream=True)), 502, "upstream_unavailable")
        # /readyz knows only what lmgate already tried (it never probes): the request above.
        assert (await client.get(gw.url + "/readyz")).status_code == 503
        async with Simulator(models=sim_models_for_port(), port=port):
            await still_serves(client, gw.url)
        await leaks.assert_none()


async def test_a_burst_of_5xx_gives_every_client_an_answer_or_a_clear_error(start_gateway, leaks_of, sim, client, body):
    async with start_gateway(sim.url, circuit_breaker={"reset_timeout_s": 0.2}) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        sim.inject_fault("http_error", count=40, status=503, message="busy")
        responses: list[httpx.Response] = []

        async def one() -> None:
            responses.append(await client.post(gw.url + CHAT, json=body(stream=True)))

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(one)
        assert len(responses) == 30
        for response in responses:
            if response.status_code == 200:
                assert response.content.endswith(b"data: [DONE]\n\n")
            else:
                assert response.status_code in (503, 502) and response.json()["error"]["code"] in (
                    "upstream_error", "circuit_open", "overloaded",
                ), response.text
        sim.clear_faults()
        await anyio.sleep(0.25)  # the breaker's cool-down is part of the scenario
        await still_serves(client, gw.url)
        await leaks.assert_none()
        await sim.wait_for(lambda c: c.active_generations == 0)


# --- the upstream fails after the response started -----------------------------------------------


async def test_upstream_dying_mid_stream_ends_with_an_error_frame_never_a_clean_end(start_gateway, leaks_of, sim, client, body):
    async with start_gateway(sim.url, retry={"enabled": False}) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        sim.inject_fault("crash_mid_stream", after_tokens=3)
        assert_cut_not_finished(await client.post(gw.url + CHAT, json=body(stream=True)), "stream_cut")
        sim.inject_fault("crash_mid_stream", after_tokens=3)
        cut = await client.post(gw.url + CHAT, json=body())
        assert cut.status_code == 502 and cut.json()["error"]["code"] in ("upstream_unavailable", "stream_cut")
        sim.inject_fault("crash_mid_stream", after_tokens=3)
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        try:
            with pytest.raises(openai.APIError):
                stream = await sdk.chat.completions.create(**body(stream=True))
                async for _ in stream:
                    pass
        finally:
            await sdk.close()
        await still_serves(client, gw.url)
        await leaks.assert_none()


async def test_upstream_hanging_after_headers_is_timed_out_and_released(start_gateway, leaks_of, sim, client, body):
    async with start_gateway(sim.url, timeouts={"first_token_s": 0.3}, retry={"enabled": False}) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        sim.inject_fault("hang_after_headers")
        assert_cut_not_finished(await client.post(gw.url + CHAT, json=body(stream=True)), "timeout")
        sim.inject_fault("hang_after_headers")
        assert_openai_error(await client.post(gw.url + CHAT, json=body()), 504, "timeout")
        await sim.wait_for(lambda c: c.disconnects == 2, timeout=3)
        await still_serves(client, gw.url)
        await leaks.assert_none()


@pytest.mark.slow
async def test_an_upstream_sending_one_byte_per_second_is_cut_at_a_deadline(start_gateway, leaks_of, sim, client, body):
    async with start_gateway(sim.url, timeouts={"total_s": 2.5, "idle_s": 1.5, "first_token_s": 1.5}) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        sim.inject_fault("slow_bytes", delay_s=1.0)
        response = await client.post(gw.url + CHAT, json=body(stream=True))
        error = assert_cut_not_finished(response, "timeout")
        # Only whole frames reach the client: a frame trickling in is no first token.
        assert "first-token deadline" in error["message"]
        await sim.wait_for(lambda c: c.disconnects == 1, timeout=3)
        # The simulator noticed, but finishes the byte-by-byte write of its current frame (minutes
        # at this pace) before its generation loop looks again: end that here, as its shutdown does.
        sim.runtime.stop_requests()
        await still_serves(client, gw.url)
        await leaks.assert_none()



@pytest.mark.parametrize("kind", ["malformed_sse", "invalid_json"])
async def test_broken_frames_are_relayed_as_sent_when_streaming_and_a_502_when_assembled(
    start_gateway, leaks_of, sim, client, body, kind
):
    # lmgate never decodes frames on the streaming path: the client's parser sees exactly what LM
    # Studio sent (and the stream still ends as LM Studio ended it). A non-streaming answer is
    # assembled by lmgate, which cannot make a body out of a broken frame: 502.
    async with start_gateway(sim.url, retry={"enabled": False}) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        sim.inject_fault(kind)
        direct = await client.post(sim.url + CHAT, json=body(stream=True))
        sim.inject_fault(kind)
        through = await client.post(gw.url + CHAT, json=body(stream=True))
        assert through.status_code == 200 and unstamped(through.content) == unstamped(direct.content)
        sim.inject_fault(kind)
        assert_openai_error(await client.post(gw.url + CHAT, json=body()), 502, "upstream_protocol_error")
        await still_serves(client, gw.url)
        await leaks.assert_none()


async def test_a_huge_upstream_body_streams_through_and_is_refused_past_the_assembly_limit(
    start_gateway, leaks_of, sim, client, body
):
    size = 4 * 1024 * 1024
    async with start_gateway(sim.url, retry={"enabled": False}, limits={"assembled_bytes": 1024 * 1024}) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        sim.inject_fault("huge_body", size_bytes=size)
        received = 0
        async with client.stream("POST", gw.url + CHAT, json=body(stream=True)) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                received += len(chunk)
                tail = chunk
        assert received > size and tail.endswith(b"data: [DONE]\n\n")
        sim.inject_fault("huge_body", size_bytes=size)
        refused = await client.post(gw.url + CHAT, json=body())
        assert_openai_error(refused, 502, "upstream_protocol_error")
        assert "assembled_bytes" in refused.json()["error"]["message"]
        await still_serves(client, gw.url)
        await leaks.assert_none()


async def test_the_model_evicted_mid_generation_is_an_error_frame_or_a_502(start_gateway, leaks_of, sim, client, body):
    async with start_gateway(sim.url, retry={"enabled": False}) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        sim.inject_fault("model_unloaded_mid_stream", after_tokens=3)
        error = assert_cut_not_finished(await client.post(gw.url + CHAT, json=body(stream=True)))
        assert "unloaded" in json.dumps(error)
        await sim.load_model(WARM)
        sim.inject_fault("model_unloaded_mid_stream", after_tokens=3)
        with anyio.fail_after(3):
            evicted = await client.post(gw.url + CHAT, json=body())
        assert_openai_error(evicted, 502, "model_unloaded")
        await sim.load_model(WARM)
        await still_serves(client, gw.url)
        await leaks.assert_none()


async def test_a_context_overflow_after_the_200_reaches_the_sdk_as_an_error(start_gateway, leaks_of, sim, client, body):
    async with start_gateway(sim.url) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        sim.inject_fault("context_overflow", mode="b")  # 200, then `event: error`
        streamed = await client.post(gw.url + CHAT, json=body(stream=True))
        assert "context length" in json.dumps(assert_cut_not_finished(streamed))
        sim.inject_fault("context_overflow", mode="b")
        assert_openai_error(await client.post(gw.url + CHAT, json=body()), 400, "context_length_exceeded")
        sim.inject_fault("context_overflow", mode="b")
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        try:
            with pytest.raises(openai.APIError, match="context length"):
                stream = await sdk.chat.completions.create(**body(stream=True))
                async for _ in stream:
                    pass
        finally:
            await sdk.close()
        await still_serves(client, gw.url)
        await leaks.assert_none()


# --- LM Studio restarts under a warm pool ---------------------------------------------------------


@pytest.mark.parametrize("retry", [True, False], ids=["retry-on", "retry-off"])
async def test_lm_studio_restarting_under_pooled_connections_fails_no_request(start_gateway, leaks_of, client, body, retry):
    port = free_port()
    async with start_gateway(f"http://127.0.0.1:{port}", retry={"enabled": retry}) as gw:
        async with Simulator(models=sim_models_for_port(), port=port):
            leaks = leaks_of(gw)
            await leaks.baseline()
            async with anyio.create_task_group() as tg:  # several pooled connections
                for _ in range(4):
                    tg.start_soon(still_serves, client, gw.url)
        async with Simulator(models=sim_models_for_port(), port=port):
            results: list[int] = []

            async def one() -> None:
                results.append((await client.post(gw.url + CHAT, json=body(stream=True))).status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(one)
            assert results == [200] * 6
            await leaks.assert_none()


def sim_models_for_port() -> list[Any]:
    from gateway.simulator import SimModel

    return [SimModel(id=WARM, loaded=True, tokens_per_second=400.0, ttft_base_s=0.005, ttft_per_prompt_token_s=0.0)]


# --- the client leaves ------------------------------------------------------------------------------


async def _reach_first_chunk(response: httpx.Response) -> None:
    await anext(response.aiter_raw())


@pytest.mark.parametrize(
    ("phase", "model", "fault"),
    [
        ("before-headers", WARM, "hang_before_headers"),
        ("during-a-load", COLD, None),
        ("mid-stream", SLOW, None),
    ],
)
async def test_a_client_leaving_ends_the_upstream_request_and_leaks_nothing(
    start_gateway, leaks_of, sim, client, body, phase, model, fault
):
    async with start_gateway(sim.url, timeouts={"first_token_s": 10}) as gw:
        leaks = leaks_of(gw)
        await leaks.baseline()
        if fault is not None:
            sim.inject_fault(fault)
        reached = {
            "before-headers": lambda c: c.faults_applied == 1,
            "during-a-load": lambda c: c.loading == 1,
            "mid-stream": lambda c: c.generations_started == 1,
        }[phase]
        async with anyio.create_task_group() as tg:

            async def request() -> None:
                async with client.stream("POST", gw.url + CHAT, json=body(model, stream=True)) as response:
                    await _reach_first_chunk(response)
                    await anyio.sleep_forever()  # reading no further; cancelled below

            tg.start_soon(request)
            await sim.wait_for(reached, timeout=5)
            if phase == "mid-stream":
                await sim.wait_for(lambda c: c.active_generations == 1, timeout=5)
            tg.cancel_scope.cancel()
        if phase == "during-a-load":
            # lmgate loads the model itself (single flight): the load goes on for others, and the
            # request that left never reaches LM Studio.
            await sim.wait_for(lambda c: c.loads_completed == 1, timeout=5)
            assert sim.counters.generations_started == 0
        else:
            await sim.wait_for(lambda c: c.disconnects == 1, timeout=3)
        if phase == "mid-stream":
            await sim.wait_for(lambda c: c.generations_cancelled == 1, timeout=3)
        await still_serves(client, gw.url)
        await leaks.assert_none()


@pytest.mark.slow
async def test_five_hundred_clients_leaving_at_once_cancel_five_hundred_generations(start_gateway, leaks_of, sim, body):
    clients = 500
    sections = {
        "concurrency": {"limit": clients, "max_queue": 0},
        "upstream": {"pool": {"max_connections": clients + 10}},
        "timeouts": {"first_token_s": 30},
    }
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with start_gateway(sim.url, **sections) as gw, httpx.AsyncClient(
        timeout=30.0, trust_env=False, limits=limits
    ) as crowd:
        leaks = leaks_of(gw, crowd)
        await leaks.baseline()
        streaming = 0
        all_streaming = anyio.Event()

        async def one() -> None:
            nonlocal streaming
            async with crowd.stream("POST", gw.url + CHAT, json=body(SLOW, stream=True)) as response:
                await _reach_first_chunk(response)
                streaming += 1
                if streaming == clients:
                    all_streaming.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(one)
            with anyio.move_on_after(30):
                await all_streaming.wait()
            assert streaming == clients, (streaming, sim.counters.snapshot(), gw.app.concurrency.snapshot())
            tg.cancel_scope.cancel()  # all 500 leave at once
        await sim.wait_for(lambda c: c.generations_cancelled == clients, timeout=20)
        assert sim.counters.generations_completed == 0
        await still_serves(crowd, gw.url)
        await leaks.assert_none(timeout_s=15)
