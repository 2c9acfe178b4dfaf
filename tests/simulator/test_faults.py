"""Every injectable fault, seen from the client over a real socket."""

from __future__ import annotations

import anyio
import httpx
import pytest

from gateway.simulator import FAULT_KINDS, RealClock, SimSettings, Simulator
from gateway.simulator.errors import CRASH_MESSAGE
from gateway.simulator.testing import ASGICall, BackgroundStream, parse_sse

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(stream: bool = True, model: str = "alpha") -> dict:
    return {"model": model, "messages": MESSAGES, "stream": stream}


@pytest.fixture
async def sim(instant_models, clock):
    async with Simulator(models=instant_models, settings=SimSettings(completion_tokens=5), clock=clock) as sim:
        yield sim


async def post_stream(client, sim, body=None) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", sim.url + "/v1/chat/completions", json=body or chat()) as response:
        raw = await response.aread()
    return response, raw


async def test_http_error_in_both_shapes_with_retry_after(sim, client):
    sim.inject_fault("http_error", status=503, message="Busy", retry_after=7)
    sim.inject_fault("http_error", status=400, message="Bad", shape="object")
    first = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))
    second = await client.post(sim.url + "/v1/chat/completions", json=chat())
    third = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))
    assert (first.status_code, first.json(), first.headers["retry-after"]) == (503, {"error": "Busy"}, "7")
    assert second.status_code == 400
    assert second.json() == {"error": {"message": "Bad", "type": "invalid_request_error", "param": None, "code": None}}
    assert third.status_code == 200 and sim.counters.faults_applied == 2


async def test_a_fault_applies_to_the_next_count_requests(sim, client):
    sim.inject_fault("http_error", count=2, status=500)
    statuses = [(await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]


async def test_a_fault_can_target_one_model(sim, client):
    sim.inject_fault("http_error", model="beta", status=500)
    assert (await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))).status_code == 200
    assert (await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False, model="beta"))).status_code == 500


async def test_reset_before_response_closes_the_connection_without_an_answer(sim, client):
    sim.inject_fault("reset_before_response")
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))
    assert (await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))).status_code == 200


async def test_reset_before_response_can_send_a_tcp_reset(sim, client):
    sim.inject_fault("reset_before_response", rst=True)
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))


@pytest.mark.parametrize(("kind", "started"), [("hang_before_headers", False), ("hang_after_headers", True)])
async def test_hangs_last_until_the_client_gives_up(sim, client, kind, started):
    sim.inject_fault(kind)
    stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat())
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        await sim.wait_for(lambda c: c.faults_applied == 1)
        await anyio.wait_all_tasks_blocked()
        assert stream.started.is_set() is started and stream.raw == b""
        if started:
            assert stream.status == 200 and stream.response_headers["content-type"] == "text/event-stream"
        stream.hang_up()
        await sim.wait_for(lambda c: c.disconnects == 1)


async def test_hang_after_headers_on_a_non_streaming_request_sends_json_headers(sim, client):
    sim.inject_fault("hang_after_headers")
    stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat(stream=False))
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        await stream.started.wait()
        assert stream.response_headers["content-type"].startswith("application/json")
        stream.hang_up()


async def test_crash_mid_stream_cuts_the_connection_with_no_done(sim, client):
    sim.inject_fault("crash_mid_stream", after_tokens=2)
    stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat())
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        await stream.wait_done()
    assert isinstance(stream.error, httpx.RemoteProtocolError)  # incomplete chunked read
    assert len(stream.frames) == 2 and b"[DONE]" not in stream.raw
    assert sim.counters.generations_failed == 1


async def test_crash_mid_stream_on_a_non_streaming_request_drops_the_connection(sim, client):
    sim.inject_fault("crash_mid_stream", after_tokens=2)
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))


async def test_error_mid_stream_sends_an_error_event_then_ends(sim, client):
    sim.inject_fault("error_mid_stream", after_tokens=1)
    response, raw = await post_stream(client, sim)
    events = parse_sse(raw)
    assert response.status_code == 200 and len(events) == 2
    assert events[1].raw == b'event: error\ndata: {"error":"%s"}' % CRASH_MESSAGE.encode()
    sim.inject_fault("error_mid_stream", message="boom")
    whole = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))
    assert (whole.status_code, whole.json()) == (400, {"error": "boom"})


async def test_slow_bytes_writes_one_byte_per_message(instant_models):
    async with Simulator(models=instant_models, clock=RealClock(speed=1000), serve=False) as sim:
        sim.inject_fault("slow_bytes", delay_s=0.01)
        call = ASGICall(sim.app, "POST", "/v1/chat/completions", chat(stream=False))
        await call.call()
    bodies = [m["body"] for m in call.messages if m["type"] == "http.response.body" and m["body"]]
    assert all(len(b) == 1 for b in bodies) and len(bodies) > 100
    assert call.body_bytes.startswith(b'{"id":"chatcmpl-')


async def test_slow_bytes_over_a_socket_still_delivers_the_whole_body(instant_models, client):
    async with Simulator(models=instant_models, settings=SimSettings(completion_tokens=1), clock=RealClock(speed=1000)) as sim:
        sim.inject_fault("slow_bytes", delay_s=0.05)
        response, raw = await post_stream(client, sim)
    assert raw.endswith(b"data: [DONE]\n\n") and len(parse_sse(raw)) == 3


async def test_malformed_sse_inserts_one_broken_frame(sim, client):
    sim.inject_fault("malformed_sse", after_tokens=1)
    _, raw = await post_stream(client, sim)
    events = parse_sse(raw)
    assert events[1].data.startswith('{"id":"chatcmpl-broken"') and events[-1].data == "[DONE]"
    with pytest.raises(ValueError):
        events[1].json()
    assert len(events) == 5 + 1 + 2


async def test_invalid_json_cuts_the_body_in_half(sim, client):
    sim.inject_fault("invalid_json")
    response = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    sim.inject_fault("invalid_json")
    _, raw = await post_stream(client, sim)
    with pytest.raises(ValueError):
        parse_sse(raw)[0].json()


async def test_huge_body(sim, client):
    sim.inject_fault("huge_body", count=2, size_bytes=200_000)
    whole = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))
    assert len(whole.json()["choices"][0]["message"]["content"]) == 200_000
    _, raw = await post_stream(client, sim)
    assert len(parse_sse(raw)[0].json()["choices"][0]["delta"]["content"]) == 200_000


@pytest.mark.parametrize(
    ("mode", "stream", "status", "start"),
    [
        ("a", False, 400, b'{"error":"<LM Studio error> Trying to keep the first 4097 tokens when context the overflows.'),
        ("b", False, 400, b'{"error":{"message":"Input does not fit in context length.'),
        ("a", True, 200, b'event: error\ndata: {"error":"<LM Studio error> Trying to keep the first'),
        ("b", True, 200, b'event: error\ndata: {"error":{"message":"Input does not fit in context length. The input has 4097 tokens, but the context length only supports 4096 tokens."},"message":"Input does not fit'),
    ],
)
async def test_context_overflow_modes_a_and_b(sim, client, mode, stream, status, start):
    sim.inject_fault("context_overflow", mode=mode)
    async with client.stream("POST", sim.url + "/v1/chat/completions", json=chat(stream=stream)) as response:
        raw = await response.aread()
    assert response.status_code == status and raw.startswith(start)
    assert b"[DONE]" not in raw


async def test_context_overflow_mode_c_is_a_silent_empty_stream(sim, client):
    sim.settings.context_overflow_mode = "c"
    long = {"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "x" * 4 * 4097}]}
    _, raw = await post_stream(client, sim, long)
    events = parse_sse(raw)
    assert [e.json()["choices"][0]["delta"] for e in events[:-1]] == [{}]
    assert events[0].json()["choices"][0]["finish_reason"] == "stop" and events[-1].data == "[DONE]"


async def test_a_prompt_that_fits_does_not_overflow(sim, client):
    fits = {"model": "alpha", "messages": [{"role": "user", "content": "x" * 4 * 4096}]}
    assert (await client.post(sim.url + "/v1/chat/completions", json=fits)).status_code == 200


async def test_model_unloaded_mid_stream_on_a_non_streaming_request(sim, client):
    sim.inject_fault("model_unloaded_mid_stream", after_tokens=2)
    response = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))
    assert (response.status_code, response.json()) == (400, {"error": "Model unloaded."})
    assert sim.counters.unloads == 1


async def test_faults_apply_to_other_inference_routes_too(sim, client):
    sim.inject_fault("error_mid_stream", after_tokens=0)
    sim.inject_fault("http_error", status=502)
    embed = await client.post(sim.url + "/v1/embeddings", json={"model": "embed", "input": "x"})
    messages = await client.post(sim.url + "/v1/messages", json={"model": "alpha", "max_tokens": 5, "messages": MESSAGES})
    assert embed.status_code == 502  # embeddings skip the mid-stream fault they cannot act on
    assert messages.status_code == 400 and messages.json()["error"]["message"] == CRASH_MESSAGE


def test_unknown_kinds_and_parameters_are_refused_with_the_accepted_ones(instant_models):
    sim = Simulator(models=instant_models, serve=False)
    with pytest.raises(ValueError, match="expected one of: http_error"):
        sim.inject_fault("explode")
    with pytest.raises(ValueError, match="accepted: after_tokens"):
        sim.inject_fault("crash_mid_stream", after=3)
    assert len(FAULT_KINDS) == 14


async def test_slow_bytes_stop_as_soon_as_the_client_leaves(instant_models, client):
    async with Simulator(models=instant_models, clock=RealClock()) as sim:
        sim.inject_fault("slow_bytes", delay_s=60.0)
        stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat())
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            stream.hang_up()
            await sim.wait_for(lambda c: c.generations_cancelled == 1, timeout=2.0)
        assert sim.counters.tokens_before_cancel == [1]  # the first token's frame was being written
