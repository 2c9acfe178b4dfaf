"""The terminal proxy over real sockets, against a scripted upstream.

Behaviour against LM Studio itself (cancel phases, assembly against real bodies, the openai SDK)
is tested with the simulator in test_gateway_simulator.py.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from gateway.proxy.relay import Proxy
from gateway.server.serving import serve_in_background
from middleware.errors import ErrorMiddleware

pytestmark = pytest.mark.anyio

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"max-age=5")]


def chunk_frame(n: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % n


@pytest.fixture
async def gateway(upstream) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None), trust_env=False) as client:
        app = ErrorMiddleware(Proxy(client=client, upstream_url=upstream.url, api_key="sk-upstream"))
        async with serve_in_background(app) as server:
            yield server.url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as c:
        yield c


async def test_each_chunk_reaches_the_client_before_the_upstream_writes_the_next(upstream, gateway, client):
    released = [anyio.Event() for _ in range(5)]

    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for n in range(5):
            await send({"type": "http.response.body", "body": chunk_frame(n), "more_body": True})
            # The next chunk is written only once the client has seen this one.
            await released[n].wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    upstream.handler = handler
    seen = []
    async with client.stream("POST", gateway + "/v1/chat/completions", json={"stream": True}) as response:
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        chunks = response.aiter_raw()
        for n in range(5):
            with anyio.fail_after(2):
                seen.append(await anext(chunks))
            assert seen[-1] == chunk_frame(n)
            released[n].set()
        assert await anext(chunks) == b"data: [DONE]\n\n"


async def test_headers_are_filtered_and_forwarded_headers_added(upstream, gateway, client):
    async def handler(scope, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"connection", b"keep-alive, x-hop"),
                    (b"x-hop", b"1"),
                    (b"keep-alive", b"timeout=5"),
                    (b"x-powered-by", b"Express"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    upstream.handler = handler
    response = await client.get(
        gateway + "/v1/models?x=1",
        headers={
            "Connection": "keep-alive, x-private",
            "X-Private": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Authorization": "Bearer client-key",
            "X-Request-ID": "req-123",
            "X-Custom": "kept",
        },
    )
    assert response.json() == {"ok": True}
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["x-powered-by"] == "Express"
    assert "x-hop" not in response.headers and "keep-alive" not in response.headers
    scope, _ = upstream.requests[0]
    sent = {k.decode(): v.decode() for k, v in scope["headers"]}
    assert scope["query_string"] == b"x=1"
    assert sent["host"] == upstream.url.removeprefix("http://")
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-host"] == gateway.removeprefix("http://")
    assert sent["x-request-id"] == "req-123"
    assert sent["authorization"] == "Bearer sk-upstream"
    assert sent["x-custom"] == "kept"
    assert not {"x-private", "keep-alive", "te"} & sent.keys()


async def test_a_request_id_is_generated_when_the_client_sends_none_or_a_bad_one(upstream, gateway, client):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    upstream.handler = handler
    response = await client.get(gateway + "/v1/models", headers={"X-Request-ID": "bad id with spaces"})
    generated = response.headers["x-request-id"]
    assert generated != "bad id with spaces" and len(generated) == 32
    sent = dict(upstream.requests[0][0]["headers"])
    assert sent[b"x-request-id"] == generated.encode()


@pytest.mark.parametrize(
    "path",
    ["/v1/files", "/admin", "/v1/chat/completions/../../admin", "/api/v0/../../etc/passwd", "//v1/models", "/"],
)
async def test_routes_outside_the_list_are_404_and_never_reach_the_upstream(upstream, gateway, client, path):
    response = await client.get(gateway + path)
    assert response.status_code == 404
    assert response.headers["x-lmgate-error"] == "not_found"
    assert set(response.json()["error"]) == {"message", "type", "code"}
    assert upstream.requests == []


async def test_an_unreachable_upstream_is_502_upstream_unavailable(client):
    async with httpx.AsyncClient(trust_env=False) as upstream_client:
        # Port 9 (discard) is closed on loopback: connection refused.
        app = ErrorMiddleware(Proxy(client=upstream_client, upstream_url="http://127.0.0.1:9"))
        async with serve_in_background(app) as server:
            response = await client.post(server.url + "/v1/chat/completions", json={"model": "m", "stream": True})
    assert response.status_code == 502
    assert response.headers["x-lmgate-error"] == "upstream_unavailable"
    assert response.json()["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "expected_code"),
    [
        (400, {"error": "Trying to keep the first 15857 tokens when context the overflows."}, 400, "context_length_exceeded"),
        (400, {"error": {"message": "Invalid model identifier \"x\".", "type": "invalid_request_error",
                         "param": "model", "code": "model_not_found"}}, 400, "model_not_found"),
        (400, {"error": {"message": "No models loaded. Please load a model.", "type": "invalid_request_error",
                         "param": "model", "code": None}}, 400, "model_not_loaded"),
        (200, {"error": "Unexpected endpoint or method. (GET /api/v1/chat)"}, 404, "not_found"),
        (500, {"error": "The model has crashed without additional information. (Exit code: 11)"}, 500, "model_crashed"),
    ],
)
async def test_lm_studio_errors_keep_their_status_and_get_the_openai_shape(
    upstream, gateway, client, status, body, expected_status, expected_code
):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    upstream.handler = handler
    response = await client.get(gateway + "/api/v1/chat")  # GET on a POST route
    assert response.status_code == expected_status
    error = response.json()["error"]
    assert error["code"] == expected_code
    assert error["message"] and error["type"]
    assert response.headers["x-lmgate-error"] == expected_code


async def test_a_stream_cut_mid_way_ends_with_an_sse_error_frame_not_a_clean_end(upstream, gateway, client):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": chunk_frame(0), "more_body": True})
        # Half a frame, then the upstream dies.
        await send({"type": "http.response.body", "body": b'data: {"choi', "more_body": True})
        raise RuntimeError("upstream crashed")

    upstream.handler = handler
    async with client.stream("POST", gateway + "/v1/chat/completions", json={"stream": True}) as response:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    assert body.startswith(chunk_frame(0))
    assert b"[DONE]" not in body
    # The half-written frame is terminated before ours, so ours parses on its own.
    tail = body.split(b"\n\n")
    error_frame = [frame for frame in tail if frame.startswith(b"event: error")]
    assert len(error_frame) == 1
    payload = json.loads(error_frame[0].split(b"data: ", 1)[1])
    assert payload["error"]["code"] == "stream_cut"


async def test_a_stream_that_ends_cleanly_without_done_is_reported_as_cut(upstream, gateway, client):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": chunk_frame(0), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    upstream.handler = handler
    response = await client.post(gateway + "/v1/chat/completions", json={"stream": True})
    assert response.text.startswith(chunk_frame(0).decode())
    assert response.text.endswith("\n\n") and "event: error" in response.text and '"stream_cut"' in response.text


async def test_a_non_sse_body_cut_mid_way_is_an_aborted_transfer(upstream, gateway, client):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
        await send({"type": "http.response.body", "body": b'{"a":1}\n', "more_body": True})
        raise RuntimeError("upstream crashed")

    upstream.handler = handler
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(gateway + "/v1/responses", json={})


async def test_content_encoding_passes_through_byte_for_byte(upstream, gateway, client):
    payload = gzip.compress(b'{"data":[{"id":"m"}]}' * 100)

    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]})
        await send({"type": "http.response.body", "body": payload})

    upstream.handler = handler
    async with client.stream("GET", gateway + "/v1/models") as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert raw == payload


async def test_a_client_that_leaves_mid_stream_disconnects_the_upstream(upstream, gateway, client):
    first_sent = anyio.Event()

    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": chunk_frame(0), "more_body": True})
        first_sent.set()
        await upstream.disconnected.wait()

    upstream.handler = handler
    async with client.stream("POST", gateway + "/v1/chat/completions", json={"stream": True}) as response:
        await anext(response.aiter_raw())
        left_at = anyio.current_time()
    with anyio.fail_after(2):
        await upstream.disconnected.wait()
    assert upstream.disconnect_time is not None
    # Generous bound for a noisy machine; the target is 250 ms.
    assert upstream.disconnect_time - left_at < 1.0


async def test_a_client_that_leaves_before_headers_disconnects_the_upstream(upstream, gateway):
    reached = anyio.Event()

    async def handler(scope, receive, send):
        reached.set()
        await upstream.disconnected.wait()

    upstream.handler = handler
    async with httpx.AsyncClient(trust_env=False) as leaving, anyio.create_task_group() as tg:
        tg.start_soon(lambda: leaving.post(gateway + "/v1/chat/completions", json={}))
        with anyio.fail_after(2):
            await reached.wait()
        tg.cancel_scope.cancel()
    with anyio.fail_after(2):
        await upstream.disconnected.wait()


def _tool_stream() -> list[bytes]:
    head = '"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":"m"'
    frames = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "think"}, "logprobs": None, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "logprobs": None, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "123", "type": "function",
                                                               "function": {"name": "get", "arguments": ""}}]},
                      "logprobs": None, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]},
                      "logprobs": None, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
                      "logprobs": None, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ]
    return [b"data: {" + head.encode() + b"," + json.dumps(f)[1:].encode() + b"\n\n" for f in frames] + [b"data: [DONE]\n\n"]


async def test_non_streaming_requests_are_streamed_upstream_and_assembled(upstream, gateway, client):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for frame in _tool_stream():
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    upstream.handler = handler
    response = await client.post(gateway + "/v1/chat/completions", json={"model": "m", "messages": []})
    sent = json.loads(upstream.requests[0][1])
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello",
                    "reasoning_content": "think",
                    "tool_calls": [{"id": "123", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}}],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        # LM Studio's non-streaming usage carries the reasoning count its stream frame lacks.
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "completion_tokens_details": {"reasoning_tokens": 1},
                  "total_tokens": 7},
        "stats": {},
        "system_fingerprint": "m",
    }


async def test_an_error_event_in_an_assembled_stream_becomes_an_http_error(upstream, gateway, client):
    message = "Input does not fit in context length. The input has 31430 tokens, but the context length only supports 30000 tokens."

    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        frame = b"event: error\ndata: " + json.dumps({"error": {"message": message}, "message": message}).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": frame})

    upstream.handler = handler
    response = await client.post(gateway + "/v1/chat/completions", json={"model": "m", "messages": []})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "code": "context_length_exceeded"}


async def test_the_assembly_switch_forwards_non_streaming_requests_as_they_are(upstream, client):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"object":"chat.completion"}'})

    upstream.handler = handler
    async with httpx.AsyncClient(trust_env=False) as upstream_client:
        proxy = Proxy(client=upstream_client, upstream_url=upstream.url,
                      assemble_non_streaming={"/v1/chat/completions": False})
        async with serve_in_background(ErrorMiddleware(proxy)) as server:
            response = await client.post(server.url + "/v1/chat/completions", json={"model": "m"})
    assert response.json() == {"object": "chat.completion"}
    assert json.loads(upstream.requests[0][1]) == {"model": "m"}


async def test_forwarded_proto_and_host_from_a_proxy_in_front_are_kept(upstream, gateway, client):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    upstream.handler = handler
    # The test client connects from 127.0.0.1, like NGINX on the same machine terminating TLS.
    await client.get(gateway + "/v1/models", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "llm.example",
                                                       "X-Forwarded-For": "203.0.113.9"})
    sent = {k.decode(): v.decode() for k, v in upstream.requests[0][0]["headers"]}
    assert sent["x-forwarded-proto"] == "https"
    assert sent["x-forwarded-host"] == "llm.example"
    assert sent["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"


def test_forwarded_proto_and_host_from_an_untrusted_peer_are_replaced():
    from gateway.proxy.headers import upstream_request_headers

    scope = {"client": ("198.51.100.7", 5000), "scheme": "http",
             "headers": [(b"host", b"gw:8080"), (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"evil")]}
    sent = dict(upstream_request_headers(scope, request_id="r", api_key=None, forward_client_auth=False))
    assert sent[b"x-forwarded-proto"] == b"http"
    assert sent[b"x-forwarded-host"] == b"gw:8080"


async def test_an_upstream_cookie_never_reaches_another_clients_request(upstream, gateway, client):
    # One pooled client serves every caller: a cookie jar on it would hand one caller's session
    # cookie to the next.
    async def handler(scope, receive, send):
        headers = [(b"content-type", b"application/json"), (b"set-cookie", b"session=alice; Path=/")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    upstream.handler = handler
    first = await client.get(gateway + "/v1/models")
    assert first.headers["set-cookie"] == "session=alice; Path=/"  # passed on to the caller it was meant for
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as other:
        await other.get(gateway + "/v1/models")
    second_request_headers = dict(upstream.requests[-1][0]["headers"])
    assert b"cookie" not in second_request_headers
