"""NGINX's ``proxy_read_timeout`` against a model that loads silently, scaled down from minutes.

The production story, with the numbers used here in brackets: a model load of 30-90 s [3 s]
sends nothing, and NGINX gives up after ``proxy_read_timeout`` of silence [1 s], which for a
stream means a 200 that breaks off. lmgate's own first-token deadline must fire before NGINX's, so
the client gets lmgate's error (an SSE error event, or a JSON 504) rather than a cut. With lmgate's load heartbeats (an SSE comment every ``models.heartbeat_s`` [0.3 s]) a load of
any length passes a short ``proxy_read_timeout`` (30 s in production).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from gateway.simulator import SimModel, Simulator
from gateway.simulator.testing import parse_sse

pytestmark = pytest.mark.anyio

COLD = SimModel(id="cold-model", load_delay_s=3.0, tokens_per_second=200.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
SLOW_PREFILL = SimModel(id="slow-prefill", loaded=True, ttft_base_s=3.0, ttft_per_prompt_token_s=0.0)
CHAT = "/v1/chat/completions"
BODY = {"model": COLD.id, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
async def client():  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False) as c:
        yield c


async def cut_or_error(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> tuple[int, bytes, bool]:
    """POST and read to the end: (status, body so far, whether the transfer broke off)."""
    received = bytearray()
    async with client.stream("POST", url, json=body) as response:
        try:
            async for chunk in response.aiter_raw():
                received += chunk
        except httpx.RemoteProtocolError:
            return response.status_code, bytes(received), True
        return response.status_code, bytes(received), False


def error_code(status: int, body: bytes) -> str | None:
    """The error code of a JSON error response or of an SSE stream's ``event: error`` frame."""
    if status != 200:
        return json.loads(body)["error"]["code"]
    errors = [event for event in parse_sse(body) if event.event == "error"]
    return errors[-1].json()["error"]["code"] if errors else None


async def test_a_silent_load_longer_than_proxy_read_timeout_is_cut_by_nginx_without_heartbeats(deployed, client):
    async with (
        Simulator(models=[COLD]) as sim,
        deployed("single.conf", sim.url, read_timeout="1s") as proxy,
    ):
        started = time.monotonic()
        status, body, broken = await cut_or_error(client, proxy.base + CHAT, BODY)
        assert 0.9 < time.monotonic() - started < 2.5
        assert "upstream timed out (110: Connection timed out)" in proxy.error_log()
        if status == 200:
            # The stream's headers had gone out before the silence (LM Studio answers a stream's
            # headers at once, then loads): NGINX's cut is a 200 that breaks off, with no error
            # frame and no [DONE], nothing a client can tell from a network fault.
            assert broken and b"[DONE]" not in body and error_code(status, body) is None
        else:
            # Nothing had gone out: NGINX's own 504, which the sample renders as JSON.
            assert (status, error_code(status, body)) == (504, "proxy_timeout")
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
        assert sim.counters.generations_completed == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-streaming"])
async def test_lmgate_answers_first_when_its_deadline_is_shorter_than_nginx(deployed, client, stream):
    # The rule behind the samples' 300 s: proxy_read_timeout longer than timeouts.first_token_s,
    # so a first token that takes too long (here a 3 s prompt-processing phase of a loaded model)
    # ends with lmgate's error, in a shape clients understand: a JSON 504, or an SSE error event
    # if the stream's headers had already gone out.
    async with (
        Simulator(models=[SLOW_PREFILL]) as sim,
        deployed("single.conf", sim.url, {"timeouts": {"first_token_s": 1.0}}, read_timeout="2s") as proxy,
    ):
        started = time.monotonic()
        body = {**BODY, "model": SLOW_PREFILL.id, "stream": stream}
        status, answer, broken = await cut_or_error(client, proxy.base + CHAT, body)
        assert 0.9 < time.monotonic() - started < 1.9
        assert not broken
        assert status in ((200, 504) if stream else (504,))
        assert error_code(status, answer) == "timeout"
        assert "upstream timed out" not in proxy.error_log()
        assert sim.counters.generations_completed == 0


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
        comments = [line for line in raw.split(b"\n") if line.startswith(b":")]
        assert len(comments) >= 5  # about one per 0.3 s of the 3 s load
        events = [event for event in parse_sse(raw) if event.data]
        assert events[-1].data == "[DONE]"
        assert any(e.json()["choices"] and e.json()["choices"][0]["delta"].get("content") for e in events[:-1])
        assert "upstream timed out" not in proxy.error_log()
        assert sim.counters.loads_completed == 1 and sim.counters.generations_completed == 1
