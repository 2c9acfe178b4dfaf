"""NGINX's ``proxy_read_timeout`` against a model that loads silently, scaled down from minutes.

The production story, with the numbers used here in brackets: a model load of 30-90 s [3 s]
sends nothing, and NGINX gives up after ``proxy_read_timeout`` of silence [1 s], which for a
stream means a 200 that breaks off. lmgate's own first-token deadline must fire before NGINX's, so
the client gets lmgate's error (an SSE error event, or a JSON 504) rather than a cut. With lmgate's load heartbeats (an SSE comment every ``models.heartbeat_s`` [0.3 s]) a load of
any length passes a short ``proxy_read_timeout`` (30 s in production).
"""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.simulator import SimModel, Simulator
from gateway.simulator.testing import parse_sse

pytestmark = pytest.mark.anyio

COLD = SimModel(id="cold-model", load_delay_s=3.0, tokens_per_second=200.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
CHAT = "/v1/chat/completions"
BODY = {"model": COLD.id, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
async def client():  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False) as c:
        yield c


async def test_a_silent_load_longer_than_proxy_read_timeout_is_cut_by_nginx_without_heartbeats(deployed, client):
    async with (
        Simulator(models=[COLD]) as sim,
        deployed("single.conf", sim.url, read_timeout="1s") as proxy,
    ):
        started = time.monotonic()
        async with client.stream("POST", proxy.base + CHAT, json=BODY) as response:
            # LM Studio answers a stream's headers at once and then loads the model in silence;
            # lmgate passes the headers on, so NGINX's cut arrives as a 200 stream that breaks
            # off: no error frame, no [DONE], nothing a client can tell from a network fault.
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in response.aiter_raw():
                    pass
        assert 0.9 < time.monotonic() - started < 2.5
        assert "upstream timed out (110: Connection timed out) while reading upstream" in proxy.error_log()
        # NGINX hung up on lmgate, so lmgate hung up on the simulator: the load was for nothing.
        await sim.wait_for(lambda c: c.disconnects == 1, timeout=3)
        assert sim.counters.generations_completed == 0


async def test_a_silent_non_streaming_request_gets_nginx_json_504(deployed, client):
    # A non-streaming answer has no headers until it is complete: NGINX's cut is a 504, which the
    # sample renders as OpenAI-shaped JSON.
    async with (
        Simulator(models=[COLD]) as sim,
        deployed("single.conf", sim.url, read_timeout="1s") as proxy,
    ):
        started = time.monotonic()
        response = await client.post(proxy.base + CHAT, json={**BODY, "stream": False})
        assert 0.9 < time.monotonic() - started < 2.5
        assert response.status_code == 504
        assert response.headers["x-lmgate-error"] == "proxy_timeout"
        assert response.json()["error"]["code"] == "proxy_timeout"
        await sim.wait_for(lambda c: c.disconnects == 1, timeout=3)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-streaming"])
async def test_lmgate_answers_first_when_its_deadline_is_shorter_than_nginx(deployed, client, stream):
    # The rule behind the samples' 300 s: proxy_read_timeout longer than timeouts.first_token_s,
    # so a load that takes too long ends with lmgate's error, in a shape clients understand.
    async with (
        Simulator(models=[COLD]) as sim,
        deployed("single.conf", sim.url, {"timeouts": {"first_token_s": 1.0}}, read_timeout="2s") as proxy,
    ):
        started = time.monotonic()
        response = await client.post(proxy.base + CHAT, json={**BODY, "stream": stream})
        assert 0.9 < time.monotonic() - started < 1.9
        if stream:
            # The headers had gone out, so the stream ends with an error event, not a clean end.
            assert response.status_code == 200
            (event,) = parse_sse(response.content)
            assert event.event == "error" and event.json()["error"]["code"] == "timeout"
        else:
            assert response.status_code == 504
            assert response.headers["x-lmgate-error"] == "timeout"
            assert response.json()["error"]["code"] == "timeout"
        assert "upstream timed out" not in proxy.error_log()
        await sim.wait_for(lambda c: c.disconnects == 1, timeout=3)


@pytest.mark.skip(reason="needs issue 5 heartbeats (models.heartbeat_s)")
async def test_a_silent_load_passes_a_short_proxy_read_timeout_with_heartbeats(deployed, client):
    # Same load and NGINX as the cut above; lmgate now sends a heartbeat every 0.3 s while the
    # model loads, so NGINX never waits 1 s for a byte and the answer arrives whole.
    heartbeats = {"models": {"heartbeat_s": 0.3}, "timeouts": {"first_token_s": 10.0}}
    async with (
        Simulator(models=[COLD]) as sim,
        deployed("single.conf", sim.url, heartbeats, read_timeout="1s") as proxy,
    ):
        async with client.stream("POST", proxy.base + CHAT, json=BODY) as response:
            assert response.status_code == 200
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        assert raw.count(b"\n:") + raw.startswith(b":") >= 5  # comments during the 3 s load
        events = parse_sse(raw)
        assert events[-1].data == "[DONE]"
        assert "".join(
            e.json()["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.json()["choices"]
        )
        assert "upstream timed out" not in proxy.error_log()
        assert sim.counters.loads_completed == 1 and sim.counters.generations_completed == 1
