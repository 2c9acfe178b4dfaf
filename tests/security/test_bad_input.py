"""Bad input, through a real lmgate in front of the simulator: each is a 4xx in the OpenAI error
shape, and LM Studio never sees what it cannot serve."""

from __future__ import annotations

import json
import socket

import anyio
import pytest

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def chat(**extra: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


# (name, method, path, headers, body, status, code)
CASES = [
    ("malformed JSON", "POST", CHAT, JSON, b'{"model": ', 400, "bad_request"),
    ("empty body", "POST", CHAT, JSON, b"", 400, "bad_request"),
    ("a JSON array", "POST", CHAT, JSON, b"[1, 2]", 400, "bad_request"),
    ("NaN", "POST", CHAT, JSON, b'{"model": "m", "temperature": NaN}', 400, "bad_request"),
    ("nested 100k deep", "POST", CHAT, JSON, b"[" * 100_000 + b"]" * 100_000, 400, "bad_request"),
    ("invalid UTF-8 body", "POST", CHAT, JSON, b'{"model": "\xff\xfe"}', 400, "bad_request"),
    ("text/plain", "POST", CHAT, {"content-type": "text/plain"}, chat(), 415, "unsupported_media_type"),
    ("a form", "POST", CHAT, {"content-type": "application/x-www-form-urlencoded"}, b"model=m", 415,
     "unsupported_media_type"),
    ("missing model", "POST", CHAT, JSON, b'{"messages": []}', 400, "missing_required_parameter"),
    ("empty model", "POST", CHAT, JSON, b'{"model": ""}', 400, "missing_required_parameter"),
    ("model not a string", "POST", CHAT, JSON, b'{"model": 7}', 400, "invalid_type"),
    ("stream not a boolean", "POST", CHAT, JSON, chat(stream="yes"), 400, "invalid_type"),
    # lmgate writes into stream_options; a string there was a 500 (found by schemathesis, test_openapi.py)
    ("stream_options not an object", "POST", CHAT, JSON, chat(stream=True, stream_options="usage"), 400, "invalid_type"),
    ("stream_options a list", "POST", CHAT, JSON, chat(stream_options=[1]), 400, "invalid_type"),
    ("huge headers", "GET", "/v1/models", {"x-padding": "a" * 13_000}, b"", 431, "headers_too_large"),
    ("a very long URL", "GET", "/v1/models?q=" + "a" * 9_000, {}, b"", 414, "uri_too_long"),
    ("invalid UTF-8 in the path", "GET", "/api/v0/models/%ff", {}, b"", 400, "bad_request"),
    ("invalid UTF-8 in the query", "GET", "/v1/models?q=%c3%28", {}, b"", 400, "bad_request"),
    ("a path outside the routes", "GET", "/admin/config", {}, b"", 404, "not_found"),
    ("dot segments", "GET", "/api/v0/../../etc/passwd", {}, b"", 404, "not_found"),
    ("encoded dot segments", "GET", "/api/v0/%2e%2e/%2e%2e/etc", {}, b"", 404, "not_found"),
    ("an absolute URL as the path", "GET", "//evil.example/v1/models", {}, b"", 404, "not_found"),
    ("a wrong method", "GET", CHAT, {}, b"", 405, "method_not_allowed"),
    ("DELETE on the model list", "DELETE", "/v1/models", {}, b"", 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("name", "method", "path", "headers", "body", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_a_4xx_in_the_openai_shape_and_never_forwarded(
    sim, start_gateway, client, name, method, path, headers, body, status, code
):
    async with start_gateway(sim.url) as gw:
        response = await client.request(method, gw.url + path, headers=headers, content=body)
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert response.headers["x-lmgate-error"] == code
    assert sim.counters.requests == 0


async def test_a_body_over_the_default_10_mib_is_413_before_it_is_read_whole(sim, start_gateway, client):
    async with start_gateway(sim.url) as gw:
        response = await client.post(gw.url + CHAT, headers=JSON, content=b" " * (10 * 1024 * 1024 + 1))
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
        small = await client.post(gw.url + CHAT, headers=JSON, content=chat())
        assert small.status_code == 200
    assert sim.counters.requests == 1


async def test_the_body_limit_is_configurable_and_holds_for_chunked_uploads(sim, start_gateway, client):
    async def chunks():
        for _ in range(8):
            yield b" " * 512

    async with start_gateway(sim.url, limits={"body_bytes": 2048}) as gw:
        response = await client.post(gw.url + CHAT, headers=JSON, content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert sim.counters.requests == 0


async def test_a_request_without_content_type_is_accepted_when_its_body_is_json(sim, start_gateway, client):
    async with start_gateway(sim.url) as gw:
        response = await client.post(gw.url + CHAT, content=chat(), headers={"content-type": ""})
    assert response.status_code == 200


async def test_an_unknown_model_is_lm_studios_answer_in_the_openai_shape(sim, start_gateway, client):
    async with start_gateway(sim.url) as gw:
        response = await client.post(gw.url + CHAT, json={"model": "no-such-model", "messages": []})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_lone_surrogate_escape_is_passed_on_not_a_500(sim, start_gateway, client, stream):
    # "\ud800" is valid JSON but cannot be encoded as UTF-8; lmgate re-encodes bodies to ask for usage.
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}], "stream": %s}' % (
        MODEL.encode(), b"true" if stream else b"false"
    )
    async with start_gateway(sim.url) as gw:
        response = await client.post(gw.url + CHAT, headers=JSON, content=body)
    assert response.status_code == 200, response.text[:300]
    assert sim.counters.requests == 1


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # until the server closes: the connection must not stay open
            received += chunk
    return received


async def test_conflicting_content_length_and_transfer_encoding_is_400_and_the_connection_closes(
    sim, start_gateway
):
    body = chat()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: lmgate\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    )
    async with start_gateway(sim.url) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        answer = await anyio.to_thread.run_sync(raw_request, port, request)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["error"]["code"] == "bad_request"
    assert sim.counters.requests == 0
