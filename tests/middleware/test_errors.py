"""ErrorMiddleware as the outermost layer: nothing is written to a client that has left.

asyncio logs "socket.send() raised exception." for every write to a connection that is gone (past
its fifth), and an overloaded gateway wrote once per chunk still under way to every departed
client: 90,000 such lines in one benchmark round. Once any layer has received ``http.disconnect``,
ErrorMiddleware passes no more sends on (in-process test: for any server); over a real socket the
count of such log lines is 0. An app that cannot receive the disconnect because it never suspends
is covered by lmgate's hypercorn set-up (tests/gateway/test_serving.py).
"""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest

from gateway.server.serving import serve_in_background
from gateway.simulator.testing import ASGICall
from middleware.errors import ErrorMiddleware
from middleware.types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio

SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
CHUNK = {"type": "http.response.body", "body": b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', "more_body": True}
SENT_AFTER_LEAVING = 50
ASYNCIO_WRITE_WARNING = "socket.send() raised exception."


class SlowToStop:
    """Streams until it hears ``http.disconnect``, then sends ``SENT_AFTER_LEAVING`` more chunks, as
    a relay busy with buffered upstream chunks on a loaded event loop does before it notices."""

    def __init__(self) -> None:
        self.heard_disconnect = anyio.Event()
        self.finished = anyio.Event()
        self.sends_returned = 0
        self.sends_before_hearing = 0  # sends that had returned when the disconnect was heard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            self.sends_before_hearing = self.sends_returned
            self.heard_disconnect.set()

        async def counted(message: Message) -> None:
            await send(message)
            self.sends_returned += 1

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await counted(SSE_START)
                while not gone:
                    await counted(CHUNK)
                    await anyio.sleep(0.01)
                for _ in range(SENT_AFTER_LEAVING):
                    await counted(CHUNK)
                    await anyio.sleep(0)
        finally:
            self.finished.set()


async def test_a_client_that_left_is_sent_nothing_more_so_asyncio_logs_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    app = SlowToStop()
    async with serve_in_background(ErrorMiddleware(app)) as server:
        async with httpx.AsyncClient(trust_env=False) as client:
            async with client.stream("POST", server.url + "/v1/chat/completions", json={"stream": True}) as response:
                await anext(response.aiter_raw())  # mid-stream; leaving the block closes the connection
        with anyio.fail_after(5):
            await app.finished.wait()
    writes = [r for r in caplog.records if r.name == "asyncio" and r.getMessage() == ASYNCIO_WRITE_WARNING]
    assert app.heard_disconnect.is_set() and writes == []
    assert app.sends_returned > SENT_AFTER_LEAVING  # the app's sends still return: it ends on its own terms


async def test_once_the_app_has_received_http_disconnect_nothing_more_reaches_the_server():
    # In-process, so it holds for any ASGI server: one that writes to the dead socket (hypercorn,
    # when lmgate is mounted in someone else's) gets nothing to write.
    app = SlowToStop()
    call = ASGICall(ErrorMiddleware(app), "POST", "/v1/chat/completions", {"stream": True})
    async with anyio.create_task_group() as tg:
        tg.start_soon(call.call)
        with anyio.fail_after(5):
            while len(call.messages) < 3:
                await call.changed.wait()
        call.disconnect()
        with anyio.fail_after(5):
            await app.finished.wait()
    assert app.sends_returned == app.sends_before_hearing + SENT_AFTER_LEAVING  # every send returned...
    assert len(call.messages) == app.sends_before_hearing  # ...but none after the disconnect reached the server


async def test_a_disconnect_reported_after_a_complete_response_changes_nothing():
    # Servers report http.disconnect once a response is complete, too; nothing is sent after it.
    messages: list[Message] = []
    pending: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> Message:
        return pending.pop(0)

    async def send(message: Message) -> None:
        messages.append(message)

    async def answers_then_listens(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        assert (await receive())["type"] == "http.disconnect"

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await ErrorMiddleware(answers_then_listens)(scope, receive, send)
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
