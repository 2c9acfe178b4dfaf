"""ErrorMiddleware: every leaf of the tree renders as docs/errors.md documents it; an unknown
exception is logged with the request id, answered 500 and re-raised; nothing is written to a
client that has left.

asyncio logs "socket.send() raised exception." for every write to a connection that is gone (past
its fifth), and an overloaded gateway wrote once per chunk still under way to every departed
client: 90,000 such lines in one benchmark round. Once any layer has received ``http.disconnect``,
ErrorMiddleware passes no more sends on (in-process test: for any server); over a real socket the
count of such log lines is 0. An app that cannot receive the disconnect because it never suspends
is covered by lmgate's hypercorn set-up (tests/gateway/test_serving.py).
"""

from __future__ import annotations

import json
import logging
import pathlib

import anyio
import httpx
import pytest

import gateway.models.errors
import gateway.upstreams.errors
import middleware.auth
import middleware.errors
from gateway.server.serving import serve_in_background
from gateway.simulator.testing import ASGICall
from middleware.disconnect import DISCONNECT_EXTENSION, DisconnectSignal
from middleware.errors import (
    Cancelled,
    ClientError,
    ErrorMiddleware,
    LmgateError,
    Overload,
    Timeout,
    UpstreamError,
)
from middleware.types import ASGIApp, Message, Receive, Scope, Send

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
        async with (
            httpx.AsyncClient(trust_env=False) as client,
            client.stream("POST", server.url + "/v1/chat/completions", json={"stream": True}) as response,
        ):
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


async def test_a_servers_disconnect_signal_stops_the_sends_though_nothing_read_the_disconnect():
    # lmgate's hypercorn set-up reports a client leaving through a DisconnectSignal in the scope, and
    # the proxy then never reads http.disconnect from receive(): the signal alone must stop the sends.
    signal = DisconnectSignal()
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def streams_on(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send(CHUNK)
        signal.set()  # the client is gone
        await send(CHUNK)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "extensions": {DISCONNECT_EXTENSION: signal}}
    await ErrorMiddleware(streams_on)(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


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


# --- the tree: every leaf renders as docs/errors.md says ------------------------------------------

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "errors.md"
# Where leaves are defined: the tree, and the packages that add leaves to its families.
LEAF_MODULES = (middleware.errors, middleware.auth, gateway.models.errors, gateway.upstreams.errors)
FAMILIES = {cls.__name__: cls for cls in (ClientError, Overload, Timeout, UpstreamError, Cancelled, LmgateError)}


def documented_leaves() -> list[dict[str, str]]:
    """The rows of the "Every leaf" table in docs/errors.md."""
    section = DOC.read_text().split("## Every leaf", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names = ["class", "family", "status", "code", "type", "retryable", "upstream_fault", "raised_by"]
    return [dict(zip(names, (cell.strip().strip("`") for cell in row.strip("|").split("|")), strict=True)) for row in rows]


def leaf_class(name: str) -> type[LmgateError]:
    for module in LEAF_MODULES:
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, LmgateError):
            return cls
    raise AssertionError(f"docs/errors.md names {name}, which no leaf module defines")


LEAVES = documented_leaves()


def test_every_leaf_with_fixed_attributes_is_in_the_table() -> None:
    defined = {
        name
        for module in LEAF_MODULES
        for name, cls in vars(module).items()
        if isinstance(cls, type) and issubclass(cls, LmgateError) and cls.__module__ == module.__name__
        and name not in FAMILIES
    }
    assert defined == {row["class"] for row in LEAVES}


@pytest.mark.parametrize("row", LEAVES, ids=[row["class"] for row in LEAVES])
async def test_each_leaf_has_the_documented_attributes_and_renders_them(row: dict[str, str]) -> None:
    cls = leaf_class(row["class"])
    assert all(issubclass(cls, FAMILIES[family.strip()]) for family in row["family"].split(","))
    assert (cls.status, cls.code, cls.type) == (int(row["status"]), row["code"], row["type"])
    assert (cls.retryable, cls.upstream_fault) == (row["retryable"] == "yes", row["upstream_fault"] == "yes")

    before = await render(cls("it failed", retry_after_s=2.5), started=False)
    after = await render(cls("it failed"), started=True)
    if issubclass(cls, Cancelled):  # the client is gone: nothing is sent
        assert before == [] and after == [SSE_START]
        return
    start, body = before
    headers = dict(start["headers"])
    assert start["status"] == cls.status
    assert (headers[b"content-type"], headers[b"x-lmgate-error"], headers[b"retry-after"]) == (
        b"application/json", cls.code.encode(), b"3"
    )
    document = {"error": {"message": "it failed", "type": cls.type, "code": cls.code}}
    if cls is gateway.upstreams.errors.ModelNotFound:  # LM Studio's shape names the field at fault
        document["error"]["param"] = "model"
    assert json.loads(body["body"]) == document
    assert after[1:] == [
        {"type": "http.response.body", "body": b"event: error\ndata: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n", "more_body": False}
    ]


async def render(error: LmgateError, *, started: bool) -> list[Message]:
    """What ErrorMiddleware sends for ``error`` raised before, or after an event stream started."""

    async def raising(scope: Scope, receive: Receive, send: Send) -> None:
        if started:
            await send(SSE_START)
        raise error

    return (await call(ErrorMiddleware(raising)))[0]


async def call(app: ASGIApp, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[list[Message], Scope]:
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    scope: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers or []}
    await app(scope, receive, send)
    return messages, scope


# --- unknown exceptions ---------------------------------------------------------------------------


class Bug(Exception):
    pass


async def test_an_unknown_exception_is_logged_with_the_request_id_rendered_500_and_re_raised(caplog) -> None:
    async def buggy(scope: Scope, receive: Receive, send: Send) -> None:
        raise Bug("a bug in a layer")

    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    scope: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"x-request-id", b"req-42")]}
    with caplog.at_level(logging.ERROR, logger="lmgate"), pytest.raises(Bug):
        await ErrorMiddleware(buggy)(scope, receive, send)
    assert messages[0]["status"] == 500
    assert json.loads(messages[1]["body"])["error"]["code"] == "internal_error"
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "unhandled_error"]
    assert record.request_id == "req-42" and isinstance(record.exc_info[1], Bug)  # type: ignore[attr-defined,index]


async def test_an_unknown_exception_after_a_plain_body_started_aborts_it_and_is_re_raised() -> None:
    async def buggy(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise Bug("mid-body")

    with pytest.raises(Bug):
        await call(ErrorMiddleware(buggy))


async def test_an_unknown_exception_through_a_real_server_gives_the_client_a_500() -> None:
    # hypercorn logs the re-raised exception ("Error in ASGI Framework") and keeps the 500 already sent.
    async def buggy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raise Bug("served")

    async with serve_in_background(ErrorMiddleware(buggy)) as server, httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(server.url + "/v1/chat/completions", json={})
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
