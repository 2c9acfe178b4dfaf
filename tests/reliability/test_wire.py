"""What a broken upstream gets through lmgate, byte for byte: a raw TCP upstream (``raw_upstream``,
tests/conftest.py) writes what no well-behaved server would, and the whole gateway answers real
clients (httpx, the official openai SDK) over real sockets.

* bytes past the end a response declared never reach another client's request (the connection
  is closed, not pooled), and the answer they cut short is an error, never a clean 200;
* a JSON answer where an event stream was asked for must be whole JSON;
* a stream cut inside a frame ends with lmgate's error frame alone, not half a frame in front of it;
* broken HTTP from a reachable upstream is ``upstream_protocol_error``, not retried;
* a frame larger than ``limits.frame_bytes`` is refused before it is read whole.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from gateway.simulator.testing import parse_sse

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
MODELS = "/v1/models"
MESSAGES = [{"role": "user", "content": "hi"}]
SMUGGLED = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{"smuggled":true}'
DONE = b"data: [DONE]\n\n"
NO_RETRY = {"retry": {"enabled": False}}


def token(text: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


ANSWER = [token("Hello"), token(" there", finish="stop"), DONE]


def chunked_stream(raw, frames: list[bytes], *, last: bool = True) -> bytes:
    return raw.chunked_head() + b"".join(raw.chunk(frame) for frame in frames) + (raw.LAST_CHUNK if last else b"")


def chat(stream: bool) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, "stream": stream}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content[:500]
    error = response.json()["error"]
    assert error["code"] == code and response.headers["x-lmgate-error"] == code
    return error


def stream_error(response: httpx.Response) -> dict[str, Any]:
    """The one error frame a 200 stream ended with; every frame before it is whole JSON."""
    assert response.status_code == 200 and response.content.endswith(b"\n\n")
    events = parse_sse(response.content)
    for event in events[:-1]:
        assert event.event is None and (event.data == "[DONE]" or json.loads(event.data))
    assert events[-1].event == "error", response.content[-300:]
    return events[-1].json()["error"]


def first_then_clean(raw, first: bytes):
    """An answer function: ``first`` for the first forwarded request, a clean answer after."""
    forwarded: list[Any] = []

    async def answer(request, writer: asyncio.StreamWriter) -> None:
        forwarded.append(request)
        if len(forwarded) == 1:
            writer.write(first)
        elif request.path == MODELS:
            writer.write(raw.response(b'{"object":"list","data":[{"id":"second"}]}'))
        else:
            writer.write(chunked_stream(raw, ANSWER))

    return answer


# --- 1. one client's leftovers never answer another -------------------------------------------


async def test_a_response_over_sent_on_a_plain_route_is_a_502_and_never_answers_the_next_client(
    start_gateway, raw_upstream, client
):
    raw_upstream.answer = first_then_clean(raw_upstream, raw_upstream.response(b'{"object":"list","data":[]}') + SMUGGLED)
    async with start_gateway(raw_upstream.url, **NO_RETRY) as gw, httpx.AsyncClient(trust_env=False) as other:
        error = assert_error(await client.get(gw.url + MODELS), 502, "upstream_protocol_error")
        assert "Content-Length" in error["message"]
        second = await other.get(gw.url + MODELS)
    assert second.status_code == 200 and second.json()["data"] == [{"id": "second"}]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "assembled"])
async def test_bytes_after_a_complete_stream_never_answer_the_next_client(start_gateway, raw_upstream, client, stream):
    raw_upstream.answer = first_then_clean(raw_upstream, chunked_stream(raw_upstream, ANSWER) + SMUGGLED)
    async with start_gateway(raw_upstream.url, **NO_RETRY) as gw, httpx.AsyncClient(trust_env=False) as other:
        first = await client.post(gw.url + CHAT, json=chat(stream))
        assert first.status_code == 200  # complete as its framing and [DONE] say
        second = await other.post(gw.url + CHAT, json=chat(stream))
    assert second.status_code == 200 and b"smuggled" not in second.content
    if stream:
        assert second.content.endswith(DONE)
    else:
        assert second.json()["choices"][0]["message"]["content"] == "Hello there"


async def test_an_event_stream_longer_than_its_content_length_is_cut_and_the_rest_answers_no_one(
    start_gateway, raw_upstream, client
):
    body = b"".join(ANSWER)
    declared = len(ANSWER[0]) + 10  # the header ends inside the second frame
    sent = raw_upstream.response(body, content_type=b"text/event-stream", content_length=declared)
    raw_upstream.answer = first_then_clean(raw_upstream, sent)
    async with start_gateway(raw_upstream.url, **NO_RETRY) as gw, httpx.AsyncClient(trust_env=False) as other:
        error = stream_error(await client.post(gw.url + CHAT, json=chat(True)))
        assert error["code"] == "stream_cut" and "10 bytes were dropped" in error["message"]
        second = await other.post(gw.url + CHAT, json=chat(True))
    assert second.status_code == 200 and second.content.endswith(DONE)


# --- 2. silent truncation ------------------------------------------------------------------------


async def test_a_json_answer_cut_by_its_own_content_length_is_a_502(start_gateway, raw_upstream, client):
    whole = b'{"object":"list","data":[{"id":"qwen2.5-7b-instruct"},{"id":"llama-3"}]}'
    raw_upstream.answer = first_then_clean(raw_upstream, raw_upstream.response(whole, content_length=len(whole) - 20))
    async with start_gateway(raw_upstream.url, **NO_RETRY) as gw:
        error = assert_error(await client.get(gw.url + MODELS), 502, "upstream_protocol_error")
    assert "20 more bytes" in error["message"]


async def test_a_long_body_cut_by_its_own_content_length_is_an_aborted_transfer(start_gateway, raw_upstream, client):
    whole = json.dumps({"data": [{"embedding": [0.125] * 40_000}]}).encode()  # several reads long
    raw_upstream.answer = first_then_clean(raw_upstream, raw_upstream.response(whole, content_length=len(whole) - 1000))
    async with start_gateway(raw_upstream.url, **NO_RETRY) as gw:
        with pytest.raises(httpx.RemoteProtocolError):  # the transfer ends short: never a complete 200
            await client.get(gw.url + MODELS)


@pytest.mark.parametrize("declared", ["shorter", "true"], ids=["cut-by-content-length", "cut-json"])
async def test_a_cut_json_answer_to_a_stream_request_reaches_the_sdk_as_an_error(start_gateway, raw_upstream, declared):
    cut = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"content":"Hel'
    whole = cut + b'lo"}}]}'
    sent = raw_upstream.response(whole, content_length=len(cut)) if declared == "shorter" else raw_upstream.response(cut)
    raw_upstream.answer = first_then_clean(raw_upstream, sent)
    async with start_gateway(raw_upstream.url, **NO_RETRY) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        try:
            with pytest.raises(openai.InternalServerError) as raised:
                stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                async for _ in stream:
                    pass
        finally:
            await sdk.close()
    assert raised.value.status_code == 502 and raised.value.code == "upstream_protocol_error"


async def test_a_cut_json_answer_to_an_assembled_request_is_a_502(start_gateway, raw_upstream, client):
    cut = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"content":"Hel'
    raw_upstream.answer = first_then_clean(raw_upstream, raw_upstream.response(cut))
    async with start_gateway(raw_upstream.url, **NO_RETRY) as gw:
        assert_error(await client.post(gw.url + CHAT, json=chat(False)), 502, "upstream_protocol_error")


# --- 3. half frames --------------------------------------------------------------------------------


async def test_a_stream_cut_inside_a_frame_reaches_the_sdk_as_lmgates_error_not_broken_json(start_gateway, raw_upstream, client):
    half = token(" there")[:30]

    async def answer(request, writer: asyncio.StreamWriter) -> None:
        writer.write(chunked_stream(raw_upstream, [token("Hello"), half], last=False))
        await writer.drain()
        writer.close()  # dies inside the second frame

    raw_upstream.answer = answer
    async with start_gateway(raw_upstream.url, **NO_RETRY) as gw:
        error = stream_error(await client.post(gw.url + CHAT, json=chat(True)))
        assert error["code"] == "stream_cut" and f"those {len(half)} bytes were dropped" in error["message"]
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        received: list[str] = []
        try:
            with pytest.raises(openai.APIError, match="bytes were dropped"):
                stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content)
        finally:
            await sdk.close()
    assert received == ["Hello"]


async def test_frames_split_across_chunks_reach_the_client_whole_and_at_once(start_gateway, raw_upstream, client):
    raw = b"".join(ANSWER)
    pieces = [raw[:7], raw[7:len(ANSWER[0]) + 3], raw[len(ANSWER[0]) + 3:]]
    raw_upstream.answer = first_then_clean(raw_upstream, chunked_stream(raw_upstream, pieces))
    async with (
        start_gateway(raw_upstream.url, **NO_RETRY) as gw,
        client.stream("POST", gw.url + CHAT, json=chat(True)) as response,
    ):
        received = [chunk async for chunk in response.aiter_raw()]
    assert b"".join(received) == raw
    assert all(chunk.endswith(b"\n\n") for chunk in received)


# --- 4. broken HTTP from a reachable upstream ----------------------------------------------------


@pytest.mark.parametrize(("path", "stream"), [(CHAT, False), (MODELS, None)], ids=["assembled", "plain"])
async def test_a_malformed_chunk_header_is_a_protocol_error_and_not_retried(start_gateway, raw_upstream, client, path, stream):
    content_type = b"text/event-stream" if stream is not None else b"application/json"
    raw_upstream.answer = first_then_clean(raw_upstream, raw_upstream.chunked_head(content_type) + b"zz; not hex\r\n{}\r\n")
    async with start_gateway(raw_upstream.url, retry={"backoff_base_s": 0.01}) as gw:
        if stream is None:
            response = await client.get(gw.url + path)
        else:
            response = await client.post(gw.url + path, json=chat(stream))
        error = assert_error(response, 502, "upstream_protocol_error")
    assert "could not be reached" not in error["message"] and "chunk" in error["message"]
    assert response.headers["x-lmgate-attempts"] == "1"
    assert [r.path for r in raw_upstream.requests if not r.path.startswith("/api/")] == [path]


# --- 5. a frame larger than limits.frame_bytes ------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "assembled"])
async def test_a_frame_over_the_bound_is_refused_before_it_is_read_whole(start_gateway, raw_upstream, client, stream):
    piece = b"x" * 65536
    pieces = 1024  # 64 MiB of one data: line, were it read to the end

    async def answer(request, writer: asyncio.StreamWriter) -> None:
        writer.write(raw_upstream.chunked_head() + raw_upstream.chunk(token("Hello")) + raw_upstream.chunk(b"data: "))
        for _ in range(pieces):
            writer.write(raw_upstream.chunk(piece))
            await writer.drain()  # raises once lmgate has closed the connection
        writer.write(raw_upstream.chunk(b"\n\n" + DONE) + raw_upstream.LAST_CHUNK)

    raw_upstream.answer = answer
    limits = {"frame_bytes": 256 * 1024, "assembled_bytes": 32 * 1024 * 1024}
    async with start_gateway(raw_upstream.url, limits=limits, **NO_RETRY) as gw:
        response = await client.post(gw.url + CHAT, json=chat(stream))
    if stream:
        error = stream_error(response)
        assert error["code"] == "upstream_protocol_error"
    else:
        error = assert_error(response, 502, "upstream_protocol_error")
    assert "limits.frame_bytes (262144 bytes)" in error["message"]
    assert raw_upstream.closed_early == 1  # the upstream could not write it all: lmgate hung up first
