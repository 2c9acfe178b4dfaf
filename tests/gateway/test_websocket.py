"""LM Studio's SDK WebSockets through lmgate (gateway/proxy/websocket.py), over real sockets.

A small WebSocket upstream on hypercorn speaks the first step of LM Studio's protocol (it answers
the auth packet) and then follows commands: echo a message, ``close:<code>:<reason>``, or
``big:<n>`` (send ``n`` bytes). lmgate runs in front of it (``serve_gateway``) and the client is
``websockets``, the library the relay itself uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.app import Gateway, serve_gateway
from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from middleware.auth import hash_key
from middleware.types import Receive, Scope, Send

pytestmark = pytest.mark.anyio

CLIENT_KEY = "sk-lm-Client01:abcdefghij0123456789"  # an lmgate client key in LM Studio's token format
UPSTREAM_TOKEN = "sk-lm-Upstrm01:ZYXWVUTSRQ9876543210"  # LM Studio's own token, known to lmgate only
GUEST = {"authVersion": 1, "clientIdentifier": "guest:3f1c", "clientPasskey": "9a7e-guest"}


def packet(token: str | None) -> str:
    if token is None:
        return json.dumps(GUEST)
    identifier, passkey = token.removeprefix("sk-lm-").split(":")
    return json.dumps({"authVersion": 1, "clientIdentifier": identifier, "clientPasskey": passkey})


@dataclass
class Socket:
    """What the upstream saw on one socket."""

    path: str
    headers: dict[str, str]
    auth: Any = None
    received: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    closed: anyio.Event = field(default_factory=anyio.Event)


class SocketUpstream:
    """A scripted WebSocket upstream (see the module docstring); it records every socket."""

    def __init__(self) -> None:
        self.url = ""
        self.sockets: list[Socket] = []
        self.connected = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        socket = Socket(scope["path"], headers)
        self.sockets.append(socket)
        await send({"type": "websocket.accept"})
        self.connected.set()
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    socket.close_code, socket.close_reason = message.get("code"), message.get("reason")
                    return
                data = message.get("text") if message.get("text") is not None else message.get("bytes")
                if socket.auth is None:
                    socket.auth = json.loads(data)
                    await send({"type": "websocket.send", "text": json.dumps({"success": True})})
                    continue
                socket.received.append(data)
                if isinstance(data, str) and data.startswith("close:"):
                    _, code, reason = data.split(":", 2)
                    await send({"type": "websocket.close", "code": int(code), "reason": reason})
                    return
                if isinstance(data, str) and data.startswith("big:"):
                    await send({"type": "websocket.send", "bytes": b"x" * int(data[4:])})
                    continue
                key = "text" if isinstance(data, str) else "bytes"
                await send({"type": "websocket.send", key: data})
        finally:
            socket.closed.set()


@pytest.fixture
async def upstream() -> AsyncIterator[SocketUpstream]:
    up = SocketUpstream()
    async with serve_in_background(up) as server:
        up.url = server.url
        yield up


@asynccontextmanager
async def lmgate(upstream_url: str, **sections: Any) -> AsyncIterator[tuple[str, Gateway]]:
    document: dict[str, Any] = {"upstream": {"url": upstream_url}, "models": {"enabled": False}, **sections}
    if "upstreams" in sections:
        del document["upstream"]
    async with serve_gateway(Config.model_validate(document)) as (url, gateway):
        yield url.replace("http://", "ws://"), gateway


@asynccontextmanager
async def sdk_socket(url: str, token: str | None = None, **options: Any) -> AsyncIterator[ClientConnection]:
    """A socket as the SDK opens one: connect, send the auth packet, read the answer."""
    async with connect(url, proxy=None, max_size=None, **options) as ws:
        await ws.send(packet(token))
        assert json.loads(await ws.recv()) == {"success": True}
        yield ws


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        with anyio.fail_after(10):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


async def test_messages_go_both_ways_unchanged_text_and_binary_large_ones_too(upstream):
    large_text = json.dumps({"fragment": "é" * 300_000})  # non-ASCII, over 512 KiB
    large_bytes = bytes(range(256)) * 8192  # 2 MiB
    async with lmgate(upstream.url) as (url, _), sdk_socket(url + "/llm") as ws:
        for message in ['{"type":"rpcCall","endpoint":"listLoaded","callId":0}', b"\x00\x01\xff", large_text, large_bytes]:
            await ws.send(message)
            echoed = await ws.recv()
            assert echoed == message and type(echoed) is type(message)
        await ws.send("big:3000000")
        assert await ws.recv() == b"x" * 3_000_000
    [socket] = upstream.sockets
    assert socket.path == "/llm"
    assert socket.received[:4] == ['{"type":"rpcCall","endpoint":"listLoaded","callId":0}', b"\x00\x01\xff", large_text, large_bytes]


async def test_a_client_that_leaves_closes_the_upstream_at_once_with_its_code(upstream):
    async with lmgate(upstream.url) as (url, _):
        async with sdk_socket(url + "/embedding") as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.close(4001, "client done")
        [socket] = upstream.sockets
        with anyio.fail_after(5):
            await socket.closed.wait()
    assert (socket.close_code, socket.close_reason) == (4001, "client done")


async def test_an_upstream_that_leaves_closes_the_client_with_its_code_and_reason(upstream):
    async with lmgate(upstream.url) as (url, _), sdk_socket(url + "/system") as ws:
        await ws.send("close:4002:model unloaded")
        assert await closed_with(ws) == (4002, "model unloaded")


async def test_paths_that_are_no_sdk_namespace_are_refused_at_the_upgrade(upstream):
    async with lmgate(upstream.url) as (url, _):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url + "/v1/chat/completions", proxy=None):
                pass
    assert info.value.response.status_code == 404
    assert json.loads(info.value.response.body)["error"]["code"] == "not_found"
    assert upstream.sockets == []


def keyed(**auth: Any) -> dict[str, Any]:
    return {"auth": {"keys": [hash_key(CLIENT_KEY)], **auth}}


async def test_the_key_in_the_auth_packet_is_checked_and_lmgates_own_token_goes_upstream(upstream):
    sections = {**keyed(), "upstream": {"url": upstream.url, "api_key": UPSTREAM_TOKEN}}
    async with lmgate(upstream.url, **sections) as (url, _), sdk_socket(url + "/llm", CLIENT_KEY) as ws:
        await ws.send("ping")
        assert await ws.recv() == "ping"
    [socket] = upstream.sockets
    assert socket.auth == {"authVersion": 1, "clientIdentifier": "Upstrm01", "clientPasskey": "ZYXWVUTSRQ9876543210"}
    assert socket.headers["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert "Client01" not in json.dumps(socket.headers) and "abcdefghij" not in json.dumps(socket.headers)


async def test_without_an_upstream_token_the_clients_key_becomes_a_stable_guest_identity(upstream):
    async with lmgate(upstream.url, **keyed()) as (url, _):
        for path in ("/llm", "/files"):
            async with sdk_socket(url + path, CLIENT_KEY):
                pass
    first, second = (socket.auth for socket in upstream.sockets)
    assert first == second  # the client's sockets share one identity upstream, as they would direct
    assert first["clientIdentifier"].startswith("guest:lmgate-")
    assert "Client01" not in json.dumps(first) and "abcdefghij0123456789" not in json.dumps(first)


@pytest.mark.parametrize(
    "token", [None, "sk-lm-Client01:abcdefghij0123456788", "sk-lm-Other000:abcdefghij0123456789"],
    ids=["guest", "wrong-passkey", "unknown-key"],
)
async def test_a_missing_or_wrong_key_is_refused_as_lm_studio_does_before_any_upstream_connection(upstream, token):
    async with lmgate(upstream.url, **keyed()) as (url, gateway):
        async with connect(url + "/llm", proxy=None) as ws:
            await ws.send(packet(token))
            answer = json.loads(await ws.recv())
            assert await closed_with(ws) == (1008, "invalid_api_key")
        scrape = await _metrics(gateway)
    assert answer["success"] is False
    assert set(answer["error"]) == {"title", "cause", "suggestion"}
    assert upstream.sockets == []  # the upstream saw nothing
    reason = "missing_key" if token is None else "invalid_key"
    assert f'lmgate_websocket_refused_total{{reason="{reason}"}} 1.0' in scrape


async def test_a_key_in_the_upgrades_authorization_header_is_accepted_and_a_wrong_one_refused(upstream):
    async with lmgate(upstream.url, **keyed()) as (url, _):
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        async with sdk_socket(url + "/llm", None, additional_headers=headers) as ws:
            await ws.send("ok")
            assert await ws.recv() == "ok"
        with pytest.raises(InvalidStatus) as info:
            async with connect(url + "/llm", proxy=None, additional_headers={"Authorization": "Bearer nope"}):
                pass
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body)["error"]["code"] == "invalid_api_key"
    assert len(upstream.sockets) == 1
    assert upstream.sockets[0].auth == GUEST  # a guest identity is no secret: forwarded as sent
    assert "authorization" not in upstream.sockets[0].headers


async def test_the_sdks_probe_is_answered_without_a_key_and_forwarded_with_one(upstream):
    async with lmgate(upstream.url, **keyed()) as (url, _), httpx.AsyncClient(trust_env=False) as client:
        probe = await client.get(url.replace("ws://", "http://") + "/lmstudio-greeting")
        wrong = await client.get(url.replace("ws://", "http://") + "/lmstudio-greeting", headers={"Authorization": "Bearer x"})
    assert (probe.status_code, probe.json()) == (200, {"lmstudio": True})
    assert wrong.status_code == 401


async def test_an_upstream_that_cannot_be_reached_closes_the_socket_with_1011():
    with anyio.fail_after(10):
        async with lmgate("http://127.0.0.1:9") as (url, _), connect(url + "/llm", proxy=None) as ws:
            await ws.send(packet(None))
            code, reason = await closed_with(ws)
    assert (code, reason) == (1011, "lmgate could not reach the upstream")


async def test_draining_refuses_new_upgrades_and_closes_open_sockets_with_1001_at_the_deadline(upstream):
    async with lmgate(upstream.url) as (url, gateway), sdk_socket(url + "/llm") as ws:
        gateway.drain.start()
        with pytest.raises(InvalidStatus) as info:
            async with connect(url + "/llm", proxy=None):
                pass
        assert info.value.response.status_code == 503
        assert json.loads(info.value.response.body)["error"]["code"] == "draining"
        await ws.send("still here")  # until the deadline the socket keeps working
        assert await ws.recv() == "still here"
        assert gateway.drain.in_flight == 1
        assert not await gateway.drain.wait_idle(0.05)  # the deadline passes with the socket open
        gateway.drain.abort_remaining()
        assert await closed_with(ws) == (1001, "lmgate is shutting down")
        assert await gateway.drain.wait_idle(5)
    [socket] = upstream.sockets
    with anyio.fail_after(5):
        await socket.closed.wait()
    assert socket.close_code == 1001


async def test_the_cap_on_open_sockets_refuses_the_next_upgrade(upstream):
    async with lmgate(upstream.url, websockets={"max_open": 1}) as (url, gateway), sdk_socket(url + "/llm"):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url + "/embedding", proxy=None):
                pass
        scrape = await _metrics(gateway)
    assert info.value.response.status_code == 503
    error = json.loads(info.value.response.body)["error"]
    assert error["code"] == "overloaded" and "websockets.max_open" in error["message"]
    assert 'lmgate_websocket_refused_total{reason="max_open"} 1.0' in scrape


async def test_a_message_over_the_size_limit_closes_its_senders_socket_with_1009(upstream):
    async with lmgate(upstream.url, websockets={"max_message_bytes": 4096}) as (url, _):
        async with sdk_socket(url + "/llm") as ws:
            await ws.send("y" * 5000)
            assert (await closed_with(ws))[0] == 1009
        async with sdk_socket(url + "/llm") as ws:
            await ws.send("big:5000")  # the upstream sends too much: lmgate refuses it, the client is told
            assert (await closed_with(ws))[0] == 1009
    assert all(len(data) < 4096 for socket in upstream.sockets for data in socket.received)


async def test_metrics_and_one_log_line_at_open_and_close(upstream, caplog):
    caplog.set_level(logging.INFO, logger="lmgate.websocket")
    async with lmgate(upstream.url) as (url, gateway):
        async with sdk_socket(url + "/llm") as ws:
            await ws.send("abc")
            await ws.recv()
            open_scrape = await _metrics(gateway)
            await ws.close(1000)
        await upstream.sockets[0].closed.wait()
        with anyio.fail_after(5):
            while "ws_close" not in [getattr(r, "event", None) for r in caplog.records]:
                await anyio.sleep(0.01)
        scrape = await _metrics(gateway)
    assert 'lmgate_websockets_open{namespace="/llm",upstream="default"} 1.0' in open_scrape
    assert 'lmgate_websockets_open{namespace="/llm",upstream="default"} 0.0' in scrape
    assert 'lmgate_websocket_messages_total{direction="in",namespace="/llm"} 2.0' in scrape  # the auth packet, "abc"
    assert 'lmgate_websocket_messages_total{direction="out",namespace="/llm"} 2.0' in scrape
    assert 'lmgate_websocket_message_bytes_total{direction="out",namespace="/llm"} 20.0' in scrape
    assert 'lmgate_websocket_closes_total{code="1000",namespace="/llm",side="client"} 1.0' in scrape
    assert 'lmgate_websocket_duration_seconds_count{namespace="/llm"} 1.0' in scrape
    events = [(r.event, r.__dict__) for r in caplog.records if getattr(r, "event", "").startswith("ws_")]
    assert [event for event, _ in events] == ["ws_open", "ws_close"]
    close = events[1][1]
    assert (close["closed_by"], close["code"], close["messages_in"], close["messages_out"]) == ("client", 1000, 2, 2)


async def _metrics(gateway: Gateway) -> str:
    metrics = gateway.telemetry.metrics
    assert metrics is not None
    return metrics.render(None)[0].decode()


async def test_with_several_upstreams_each_socket_stays_on_one_chosen_at_upgrade_the_least_busy_reachable_first():
    first, second = SocketUpstream(), SocketUpstream()
    async with serve_in_background(first) as a, serve_in_background(second) as b:
        upstreams = [{"name": "dead", "url": "http://127.0.0.1:9"}, {"name": "a", "url": a.url}, {"name": "b", "url": b.url}]
        async with lmgate("", upstreams=upstreams) as (url, _), sdk_socket(url + "/llm") as one, sdk_socket(
            url + "/embedding"
        ) as two:
            for ws in (one, two):
                await ws.send("hi")
                assert await ws.recv() == "hi"
    # "dead" was tried and skipped; then each socket went where fewer were open, and stayed.
    assert [s.path for s in first.sockets] == ["/llm"] and first.sockets[0].received == ["hi"]
    assert [s.path for s in second.sockets] == ["/embedding"] and second.sockets[0].received == ["hi"]
