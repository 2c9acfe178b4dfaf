"""``gateway.serving``: the hypercorn set-up every lmgate server (and the simulator) runs on."""

from __future__ import annotations

import anyio
import pytest

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
