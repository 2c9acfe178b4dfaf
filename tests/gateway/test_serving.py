"""``gateway.serving``: the hypercorn set-up every lmgate server (and the simulator) runs on."""

from __future__ import annotations

import logging
import socket
import struct

import anyio
import pytest
from anyio.abc import SocketAttribute

from gateway.serving import serve_in_background
from middleware.types import Receive, Scope, Send

pytestmark = pytest.mark.anyio


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_a_keep_alive_connection_closed_by_its_client_is_closed_at_once() -> None:
    # hypercorn alone would hold the socket in CLOSE-WAIT for the whole keep-alive timeout (75 s):
    # a client opening a connection per request would run the gateway out of descriptors.
    async with serve_in_background(hello) as server:
        async with await anyio.connect_tcp(server.host, server.port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: lmgate\r\n\r\n")
            received = b""
            with anyio.fail_after(5):
                while not received.endswith(b"ok"):
                    received += await stream.receive()
            assert received.startswith(b"HTTP/1.1 200")  # kept alive: the server did not close
            await stream.send_eof()
            with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                await stream.receive()  # the server closed its side too


SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
CHUNK = {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}


async def test_nothing_is_written_to_a_departed_client_even_by_an_app_that_never_yields(caplog) -> None:
    # A relay draining a backlog of buffered upstream chunks sends without ever suspending once the
    # socket is dead (the write fails at once), so it cannot receive the http.disconnect queued for
    # it. hypercorn marks the stream closed yet wrote every chunk, and asyncio logged each write:
    # tens of thousands of "socket.send() raised exception." lines in one cancel storm.
    caplog.set_level(logging.WARNING, logger="asyncio")
    client_left = anyio.Event()
    backlog_sent = anyio.Event()

    async def relay_with_a_backlog(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send(SSE_START)
        await send(CHUNK)
        await client_left.wait()
        for _ in range(50):
            await send(CHUNK)
        backlog_sent.set()

    async with serve_in_background(relay_with_a_backlog) as server:
        stream = await anyio.connect_tcp(server.host, server.port)
        await stream.send(b"GET / HTTP/1.1\r\nHost: lmgate\r\n\r\n")
        received = b""
        with anyio.fail_after(5):
            while not received.endswith(b"data: {}\n\n\r\n"):
                received += await stream.receive()
        # Leave with a reset, as a client killed mid-stream does: the server's writes then fail.
        reset_on_close = struct.pack("ii", 1, 0)
        stream.extra(SocketAttribute.raw_socket).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset_on_close)
        await stream.aclose()
        client_left.set()
        with anyio.fail_after(5):
            await backlog_sent.wait()
    writes = [r for r in caplog.records if r.name == "asyncio" and r.getMessage() == "socket.send() raised exception."]
    assert writes == []
