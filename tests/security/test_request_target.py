"""The request target through a real lmgate: one canonical path decides and is forwarded, and
credentials never travel in the query.

LM Studio's server is Express: its router ignores case and a trailing slash, and Node reads ``\\``
as ``/``. Requests go out on a raw socket, so nothing normalises the target before lmgate does,
and a recording upstream shows exactly what reached it.
"""

from __future__ import annotations

import json
import logging
import socket
from functools import partial

import anyio
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.app import build_app
from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from middleware.auth import hash_key

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
CLIENT, ADMIN = "sk-client-aaaaaaaaaaaa", "sk-admin-cccccccccccc"
AUTH = {"keys": [hash_key(CLIENT)], "admin_keys": [hash_key(ADMIN)]}
LOAD = json.dumps({"model": MODEL}).encode()

# (name, method, target, status with a client key). None of them may reach the upstream.
CLIENT_KEY_REFUSED = [
    ("mixed case", "POST", "/api/v1/Models/load", 403),
    ("upper case", "POST", "/api/v1/MODELS/unload", 403),
    ("all upper case", "POST", "/API/V1/MODELS/LOAD", 403),
    ("OPTIONS", "OPTIONS", "/api/v1/models/load", 403),
    ("OPTIONS, mixed case", "OPTIONS", "/api/v1/Models/unload", 403),
    ("GET on the load route", "GET", "/api/v1/models/load", 403),
    ("POST on the model list", "POST", "/api/v1/models", 403),
    ("download, mixed case", "POST", "/api/v1/Models/Download", 403),
    ("trailing slash", "POST", "/api/v1/models/load/", 403),
    ("duplicate slashes", "POST", "/api/v1//models///load", 403),
    ("leading double slash", "POST", "//api/v1/models/load", 403),
    ("encoded letters", "POST", "/api/v1/models/%6c%6Fad", 403),
    ("dot segment", "POST", "/api/v1/models/./load", 403),
    ("dot-dot", "POST", "/api/v1/chat/../models/load", 403),
    ("encoded dot-dot", "POST", "/api/v1/chat/%2e%2e/models/unload", 403),
    ("encoded dot-dot, upper case", "POST", "/api/v1/chat/%2E%2E/Models/load", 403),
    ("dot-dot above the root", "POST", "/../../api/v1/models/load", 403),
    ("double-encoded dot-dot", "POST", "/api/v1/chat/%252e%252e/models/load", 400),
    ("double-encoded slash", "POST", "/api/v1/models%252fload", 400),
    ("..; path parameter", "POST", "/api/v1/chat/..;/models/load", 400),
    ("a path parameter", "POST", "/api/v1/models/load;x=1", 400),
    ("encoded NUL", "POST", "/api/v1/models/load%00", 400),
    ("encoded NUL before a suffix", "POST", "/api/v1/models/load%00.json", 400),
    ("backslash", "POST", "/api/v1/models\\load", 400),
    ("encoded backslash", "POST", "/api/v1/models%5Cload", 400),
    ("a '%' that starts no escape", "POST", "/api/v1/models/load%", 400),
    ("overlong UTF-8 for '/'", "POST", "/api/v1/models%c0%afload", 400),
    ("encoded '?'", "POST", "/api/v1/models/load%3F", 400),
    ("encoded slash: data, not a separator", "POST", "/api/v1/models%2Fload", 404),
    ("lmgate's own action, double slash", "POST", "/lmgate//models/qwen/unload", 403),
    ("lmgate's own action, upper case", "POST", "/LMGATE/models/qwen/unload", 404),
]


def raw_request(port: int, method: str, target: str, *, key: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request with ``target`` exactly as given; (status, body) of the answer."""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: lmgate\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode("latin-1") + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), rest.partition(b"\r\n\r\n")[2]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def answer_ok(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"object":"list","data":[]}'})


@pytest.mark.parametrize(("name", "method", "target", "status"), CLIENT_KEY_REFUSED, ids=[c[0] for c in CLIENT_KEY_REFUSED])
async def test_a_client_key_cannot_reach_an_admin_route_by_any_spelling(upstream, start_gateway, name, method, target, status):
    upstream.handler = answer_ok
    async with start_gateway(upstream.url, auth=AUTH) as gw:
        got, body = await anyio.to_thread.run_sync(lambda: raw_request(port_of(gw.url), method, target, key=CLIENT, body=LOAD))
    assert got == status, body[:300]
    error = json.loads(body)["error"]
    assert error["code"] == {400: "bad_request", 403: "permission_denied", 404: "not_found"}[status]
    assert error["message"] and error["type"]
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("method", "target", "forwarded"),
    [
        ("POST", "/api/v1/Models/load", b"/api/v1/models/load"),
        ("POST", "/api/v1/chat/%2e%2e/MODELS/unload/", b"/api/v1/models/unload"),
        ("OPTIONS", "/api/v1//models/load", b"/api/v1/models/load"),
        ("GET", "/api/v0/models/google%2Fgemma-3-4b", b"/api/v0/models/google%2Fgemma-3-4b"),  # a key with '/'
        ("GET", "/API/v0/models/Qwen-7B/", b"/api/v0/models/Qwen-7B"),  # the parameter keeps its case
        ("GET", "/v1/Models", b"/v1/models"),
    ],
)
async def test_what_reaches_the_upstream_is_the_path_lmgate_decided_on(upstream, start_gateway, method, target, forwarded):
    upstream.handler = answer_ok
    async with start_gateway(upstream.url, auth=AUTH) as gw:
        got, body = await anyio.to_thread.run_sync(lambda: raw_request(port_of(gw.url), method, target, key=ADMIN, body=LOAD))
    assert got == 200, body[:300]
    [(scope, _)] = upstream.requests
    assert (scope["method"], scope["raw_path"]) == (method, forwarded)


async def test_mounted_lmgate_normalises_below_the_mount_point(upstream):
    upstream.handler = answer_ok
    config = Config.model_validate({"upstream": {"url": upstream.url}, "auth": AUTH, "models": {"enabled": False}})
    app = build_app(config, env={})
    try:
        async with serve_in_background(Starlette(routes=[Mount("/llm", app=app)])) as server:
            port = port_of(server.url)
            refused = await anyio.to_thread.run_sync(lambda: raw_request(port, "POST", "/llm/api/v1/Models/load", key=CLIENT))
            assert refused[0] == 403 and upstream.requests == []
            allowed = await anyio.to_thread.run_sync(lambda: raw_request(port, "POST", "/llm/api/v1/Models/load/", key=ADMIN))
    finally:
        await app.aclose()
    assert allowed[0] == 200
    assert [scope["raw_path"] for scope, _ in upstream.requests] == [b"/api/v1/models/load"]


async def test_ordinary_clients_are_unaffected(sim, start_gateway):
    async with start_gateway(sim.url, auth=AUTH) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=CLIENT, max_retries=0)
        completion = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        chunks = [chunk async for chunk in await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )]
        listed = await sdk.models.list()
        port = port_of(gw.url)
        one = await anyio.to_thread.run_sync(lambda: raw_request(port, "GET", f"/api/v0/models/{MODEL}", key=CLIENT))
        await sdk.close()
    assert completion.choices[0].message.content and chunks and [m.id for m in listed.data] == [MODEL]
    assert one[0] == 200 and json.loads(one[1])["id"] == MODEL
    assert sim.counters.http_requests == 4


async def test_a_model_key_with_a_slash_still_names_one_model_on_lmgates_routes(start_gateway):
    from gateway.simulator import SimModel, Simulator

    key = "google/gemma-3-4b"
    model = SimModel(id=key, loaded=True, tokens_per_second=float("inf"), ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model]) as sim, start_gateway(sim.url, auth=AUTH, models={"enabled": True}) as gw:
        port = port_of(gw.url)
        for target in ("/lmgate/models/google%2Fgemma-3-4b", "/lmgate/models/google/gemma-3-4b"):
            got, body = await anyio.to_thread.run_sync(partial(raw_request, port, "GET", target, key=ADMIN))
            assert got == 200 and json.loads(body)["id"] == key, (target, body[:300])
        loaded = await anyio.to_thread.run_sync(
            lambda: raw_request(port, "POST", "/lmgate/models/google%2Fgemma-3-4b/load", key=ADMIN)
        )
    assert loaded[0] == 200 and json.loads(loaded[1])["model"] == key


# --- credentials in the query -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["api_key", "key", "access_token", "token", "apikey", "api-key", "API_KEY", "api%5Fkey"])
async def test_a_key_in_the_query_is_never_forwarded(upstream, start_gateway, client, name):
    upstream.handler = answer_ok
    async with start_gateway(upstream.url, auth=AUTH) as gw:
        port = port_of(gw.url)
        target = f"/v1/models?limit=5&{name}={CLIENT}&order=asc"
        got, _ = await anyio.to_thread.run_sync(lambda: raw_request(port, "GET", target, key=CLIENT))
    assert got == 200
    [(scope, _)] = upstream.requests
    assert scope["query_string"] == b"limit=5&order=asc"
    assert CLIENT.encode() not in scope["query_string"] + b"".join(value for _, value in scope["headers"])


async def test_lmgate_does_not_accept_a_key_from_the_query(upstream, start_gateway, client):
    upstream.handler = answer_ok
    async with start_gateway(upstream.url, auth=AUTH) as gw:
        refused = await client.get(gw.url + f"/v1/models?api_key={CLIENT}")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert "query string is not accepted" in refused.json()["error"]["message"]
    assert upstream.requests == []


async def test_a_key_in_the_query_stays_out_of_logs_and_traces(upstream, caplog):
    caplog.set_level(logging.DEBUG)
    upstream.handler = answer_ok
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = Config.model_validate({"upstream": {"url": upstream.url}, "auth": AUTH, "models": {"enabled": False}})
    app = build_app(config, env={}, tracer_provider=provider)
    try:
        async with serve_in_background(app) as server:
            port = port_of(server.url)  # a raw socket: no client library logs the URL on this side
            served = await anyio.to_thread.run_sync(lambda: raw_request(port, "GET", f"/v1/models?key={CLIENT}", key=CLIENT))
            refused = await anyio.to_thread.run_sync(
                lambda: raw_request(port, "POST", f"/api/v1/models/load?access_token={CLIENT}", key="not-a-key")
            )
    finally:
        await app.aclose()
    assert served[0] == 200 and refused[0] == 401
    spans = exporter.get_finished_spans()
    assert spans  # the server span and the upstream attempt's client span
    recorded = json.dumps([{**dict(span.attributes or {}), "name": span.name} for span in spans])
    assert CLIENT not in recorded and CLIENT not in caplog.text
