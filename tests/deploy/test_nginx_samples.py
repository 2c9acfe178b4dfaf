"""The sample NGINX configs in ``deploy/nginx/``, run as users deploy them, in front of real lmgates.

Each test takes the ``sample`` fixture (every ``*.conf`` in turn) or names one. A scripted upstream
(the ``script`` fixture) stands in for LM Studio where a test must control each byte;
test_nginx_cancel.py and test_nginx_timeouts.py use the simulator.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

pytestmark = pytest.mark.anyio

SSE_HEADERS = [(b"content-type", b"text/event-stream")]
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
JSON_HEADERS = [(b"content-type", b"application/json")]
STREAM_REQUEST = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "Hello"}]}


async def embeddings_ok(scope, receive, send):  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": b'{"object":"list","data":[]}'})


def requests_to(upstream, path: str) -> list:  # type: ignore[no-untyped-def]
    """The (scope, body) pairs the scripted upstream received on ``path``."""
    return [(scope, body) for scope, body in upstream.requests if scope["path"] == path]


def frame(n: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % n


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_until(chunks: AsyncIterator[bytes], buffer: bytearray, end: bytes, *, timeout: float = 2.0) -> None:
    """Read from ``chunks`` into ``buffer`` until it ends with ``end``; fail after ``timeout``."""
    with anyio.fail_after(timeout):
        while not buffer.endswith(end):
            buffer += await anext(chunks)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False) as c:
        yield c


def test_every_sample_passes_nginx_t_as_rendered(sample, nginx_check):
    ports = [closed_port() for _ in range(2 if sample == "replicas.conf" else 1)]
    result = nginx_check(sample, lmgate_ports=ports)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


async def test_each_chunk_reaches_the_client_before_lmgate_reads_the_next(sample, script, deployed, client):
    released = [anyio.Event() for _ in range(5)]

    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for n in range(5):
            await send({"type": "http.response.body", "body": frame(n), "more_body": True})
            await released[n].wait()  # chunk n+1 is not written until the client has chunk n
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    upstream = script({CHAT: handler})
    async with deployed(sample, upstream.url) as proxy:
        async with client.stream("POST", proxy.base + CHAT, json=STREAM_REQUEST) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            chunks = response.aiter_raw()
            seen = bytearray()
            for n in range(5):
                await read_until(chunks, seen, frame(n))
                released[n].set()
            await read_until(chunks, seen, b"data: [DONE]\n\n")
        assert bytes(seen) == b"".join(frame(n) for n in range(5)) + b"data: [DONE]\n\n"


async def test_the_harness_notices_an_nginx_that_buffers(script, deployed, client):
    # The control for the test above: the same exchange through single.conf with its streaming
    # settings undone (buffering on, lmgate's X-Accel-Buffering ignored, NGINX's default HTTP/1.0
    # to the upstream) holds the first chunk back. Without this, the test above could pass on a
    # harness that cannot see buffering at all.
    released = anyio.Event()

    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": frame(0), "more_body": True})
        await released.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    upstream = script({CHAT: handler})
    buffering = {
        "proxy_buffering off;": "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;",
        "proxy_http_version 1.1;": "proxy_http_version 1.0;",
    }
    received: list[bytes] = []
    async with deployed("single.conf", upstream.url, edits=buffering) as proxy, anyio.create_task_group() as tg:

        async def request() -> None:
            async with client.stream("POST", proxy.base + CHAT, json=STREAM_REQUEST) as response:
                received.append(b"(headers)")
                async for chunk in response.aiter_raw():
                    received.append(chunk)

        tg.start_soon(request)
        await anyio.sleep(1.0)  # what reached the client in a second: not even the headers
        early = list(received)
        released.set()
    assert early == []
    assert b"".join(received) == b"(headers)" + frame(0) + b"data: [DONE]\n\n"


async def test_forwarded_headers_and_the_request_id_reach_lmgate(script, deployed, client):
    upstream = script({EMBEDDINGS: embeddings_ok})
    async with deployed("single.conf", upstream.url) as proxy:
        body = {"model": "e", "input": "hi"}
        response = await client.post(proxy.base + EMBEDDINGS, json=body, headers={"Host": "llm.example.com"})
    assert response.status_code == 200
    ((scope, _),) = requests_to(upstream, EMBEDDINGS)
    sent = {key.decode(): value.decode() for key, value in scope["headers"]}
    # The client (as NGINX saw it) first, then NGINX as lmgate saw it.
    assert sent["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"
    assert sent["x-forwarded-host"] == "llm.example.com"
    # NGINX's $request_id is the id lmgate forwards, logs and echoes to the client.
    assert re.fullmatch(r"[0-9a-f]{32}", sent["x-request-id"])
    assert response.headers["x-request-id"] == sent["x-request-id"]
    assert any(f"rid={sent['x-request-id']}" in line for line in proxy.access_log())


async def test_a_key_in_the_query_string_stays_out_of_the_access_log(sample, script, deployed, client):
    # lmgate strips ?api_key= before forwarding or logging; NGINX's own access log must not keep it.
    upstream = script({EMBEDDINGS: embeddings_ok})
    async with deployed(sample, upstream.url) as proxy:
        response = await client.post(proxy.base + EMBEDDINGS + "?api_key=sk-query-secret", json={"model": "e", "input": "hi"})
        lines = proxy.access_log()
    assert response.status_code == 200
    assert any(EMBEDDINGS in line for line in lines)
    assert not any("sk-query-secret" in line for line in lines)


async def test_long_prompts_pass_and_oversize_bodies_get_a_json_413(sample, script, deployed, client):
    upstream = script({EMBEDDINGS: embeddings_ok})
    long_prompt = json.dumps({"model": "e", "input": "x" * (2 * 1024 * 1024)}).encode()  # NGINX's default: 1 MB
    async with deployed(sample, upstream.url) as proxy:
        response = await client.post(proxy.base + EMBEDDINGS, content=long_prompt)
        assert response.status_code == 200
        assert [body for _, body in requests_to(upstream, EMBEDDINGS)] == [long_prompt]
        too_big = await client.post(proxy.base + EMBEDDINGS, content=b"x" * (11 * 1024 * 1024))
    assert too_big.status_code == 413
    assert too_big.headers["x-lmgate-error"] == "payload_too_large"
    assert too_big.json()["error"]["code"] == "payload_too_large"


async def test_nginx_own_failures_are_openai_shaped_json(sample, nginx, client):
    ports = [closed_port() for _ in range(2 if sample == "replicas.conf" else 1)]
    async with nginx(sample, lmgate_ports=ports) as proxy:
        response = await client.post(proxy.base + CHAT, json=STREAM_REQUEST)
    assert response.status_code == 502
    assert response.headers["x-lmgate-error"] == "proxy_bad_gateway"
    assert response.json()["error"]["code"] == "proxy_bad_gateway"


async def test_health_and_operator_routes_answer_through_nginx(sample, script, deployed, client):
    upstream = script({})
    async with deployed(sample, upstream.url) as proxy:
        ready = await client.get(proxy.base + "/readyz")
        alive = await client.get(proxy.base + "/healthz")
        metrics = await client.get(proxy.base + "/metrics")  # allowed from this machine only
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert not any(path in line for line in proxy.access_log() for path in ("/readyz", "/healthz", "/metrics"))


async def test_the_sub_path_sample_leaves_the_existing_site_alone(script, deployed, client, tmp_path):
    upstream = script({EMBEDDINGS: embeddings_ok})
    site = tmp_path / "www"
    site.mkdir()
    (site / "index.html").write_text("the existing site\n")
    body = {"model": "e", "input": "hi"}
    async with deployed("subpath.conf", upstream.url, site_root=site) as proxy:
        home = await client.get(proxy.url + "/")
        inside = await client.post(proxy.url + "/llm" + EMBEDDINGS, json=body)
        outside = await client.post(proxy.url + EMBEDDINGS, json=body)
    assert home.text == "the existing site\n"
    assert inside.json() == {"object": "list", "data": []}
    assert len(requests_to(upstream, EMBEDDINGS)) == 1  # the prefix was removed; outside it, nothing
    assert outside.status_code in (404, 405) and outside.headers["server"].startswith("nginx")
