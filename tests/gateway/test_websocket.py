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
