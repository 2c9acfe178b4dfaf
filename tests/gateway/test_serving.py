"""``gateway.server.serving``: the hypercorn set-up every lmgate server (and the simulator) runs on."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from gateway.server.connections import ConnectionLimiter
from gateway.server.serving import serve_in_background
from middleware.disconnect import cancel_on_disconnect, disconnect_signal
from middleware.types import Receive, Scope, Send

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(lmgate_loop: str) -> tuple[str, dict[str, bool]]:
    # Every test here on both loops lmgate serves on: asyncio's calls accept() on the listening
    # socket object, uvloop's libuv accepts in C; the connection cap must hold on both.
    return "asyncio", {"use_uvloop": lmgate_loop == "uvloop"}


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_a_keep_alive_connection_closed_by_its_client_is_closed_at_once() -> None:
    # hypercorn alone would hold the socket in CLOSE-WAIT for the whole keep-alive timeout (75 s):
    # a client opening a connection per request would run the gateway out of descriptors.
    async with serve_in_background(hello) as server, await anyio.connect_tcp(server.host, server.port) as stream:
        await stream.send(b"GET / HTTP/1.1\r\nHost: lmgate\r\n\r\n")
        received = b""
        with anyio.fail_after(5):
            while not received.endswith(b"ok"):
                received += await stream.receive()
        assert received.startswith(b"HTTP/1.1 200")  # kept alive: the server did not close
        await stream.send_eof()
        with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
            await stream.receive()  # the server closed its side too


async def test_a_client_leaving_cancels_a_watch_through_the_servers_signal_with_no_task_beside() -> None:
    # The proxy watches every request for a client leaving. hypercorn reports that only through
    # receive(), which would need a task per request reading it; lmgate's set-up gives each request
    # a DisconnectSignal that hypercorn's own http.disconnect sets, and the watch is a cancel scope.
    entered, done = anyio.Event(), anyio.Event()
    seen: dict[str, object] = {}

    async def waits_on_something_else(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        seen["signal"] = disconnect_signal(scope) is not None
        tasks = len(asyncio.all_tasks())
        watch = cancel_on_disconnect(receive, scope=scope)
        async with watch:
            seen["tasks_beside"] = len(asyncio.all_tasks()) - tasks
            entered.set()
            await anyio.sleep(30)  # the upstream, say: cancelled when the client leaves
        seen["disconnected"] = watch.disconnected
        done.set()

    async with serve_in_background(waits_on_something_else) as server:
        async with await anyio.connect_tcp(server.host, server.port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: lmgate\r\n\r\n")
            with anyio.fail_after(5):
                await entered.wait()
        with anyio.fail_after(5):
            await done.wait()
    assert seen == {"signal": True, "tasks_beside": 0, "disconnected": True}


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


# --- the connection cap (gateway/server/connections.py) ------------------------------------------------


async def get(stream: anyio.abc.SocketStream, path: str = "/", *, timeout_s: float = 10) -> bytes:
    """One keep-alive GET on ``stream``; the whole answer (``hello`` and ``held`` answer ``ok``)."""
    await stream.send(f"GET {path} HTTP/1.1\r\nHost: lmgate\r\n\r\n".encode())
    received = b""
    with anyio.fail_after(timeout_s):
        while not received.endswith(b"ok"):
            received += await stream.receive()
    return received


async def closed_by_server(stream: anyio.abc.SocketStream) -> bool:
    """Whether the server closes ``stream`` without answering (reads until it does)."""
    with anyio.fail_after(10):
        try:
            await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return True
    return False  # it answered


async def test_at_the_cap_the_longest_idle_connection_is_closed_to_admit_a_new_one() -> None:
    # A client holding every connection idle (keep-alive, or headers never finished) must not
    # lock out the next client: a health check on a fresh connection is still answered.
    async with serve_in_background(hello, connections=ConnectionLimiter(3)) as server:
        idle = [await anyio.connect_tcp(server.host, server.port) for _ in range(3)]
        try:
            for stream in idle:
                assert (await get(stream)).startswith(b"HTTP/1.1 200")  # accepted, answered, now idle
            async with await anyio.connect_tcp(server.host, server.port) as fresh:
                assert (await get(fresh)).startswith(b"HTTP/1.1 200")
            assert await closed_by_server(idle[0])  # idle longest
            for stream in idle[1:]:
                assert (await get(stream)).startswith(b"HTTP/1.1 200")  # kept
        finally:
            for stream in idle:
                await stream.aclose()


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_closed_at_once() -> None:
    arrived = 0
    both_arrived, release, both_answered = anyio.Event(), anyio.Event(), anyio.Event()

    async def held(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal arrived
        if scope["type"] != "http":
            return
        if scope["path"] == "/held":
            arrived += 1
            if arrived == 2:
                both_arrived.set()
            await release.wait()
        await hello(scope, receive, send)

    limiter = ConnectionLimiter(2)
    async with serve_in_background(held, connections=limiter) as server, anyio.create_task_group() as tg:
        busy = [await anyio.connect_tcp(server.host, server.port) for _ in range(2)]
        answers: list[bytes] = []

        async def ask(stream: anyio.abc.SocketStream) -> None:
            answers.append(await get(stream, "/held"))
            if len(answers) == 2:
                both_answered.set()

        for stream in busy:
            tg.start_soon(ask, stream)
        with anyio.fail_after(10):
            await both_arrived.wait()
        async with await anyio.connect_tcp(server.host, server.port) as refused:
            await refused.send(b"GET / HTTP/1.1\r\nHost: lmgate\r\n\r\n")
            assert await closed_by_server(refused)
        release.set()
        with anyio.fail_after(10):
            await both_answered.wait()
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)  # the busy ones were kept
        for stream in busy:
            await stream.aclose()
    assert limiter.open == 0


class Events(logging.Handler):
    """Collects the ``event`` of each record; ``recovered`` is set on ``connections_recovered``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[str] = []
        self.recovered = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", "")
        self.events.append(event)
        if event == "connections_recovered":
            self.recovered.set()


@pytest.fixture
def connection_events() -> Iterator[Events]:
    handler = Events()
    log = logging.getLogger("lmgate.connections")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


async def test_reaching_the_cap_and_recovering_are_logged_once_each(connection_events: Events) -> None:
    limiter = ConnectionLimiter(1, quiet_s=0.2)
    async with serve_in_background(hello, connections=limiter) as server:
        for _ in range(5):  # each new connection evicts the one before: one episode, not five lines
            stream = await anyio.connect_tcp(server.host, server.port)
            assert (await get(stream)).startswith(b"HTTP/1.1 200")
        await stream.aclose()
        with anyio.fail_after(10):
            await connection_events.recovered.wait()
    assert connection_events.events == ["connections_exhausted", "connections_recovered"]


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
async def test_a_descriptor_near_the_open_files_limit_lowers_the_cap_to_keep_sixteen_free() -> None:
    # uvloop never reports EMFILE (libuv sheds the queued connections itself), so the number of
    # a new connection's descriptor is what tells lmgate how few are left: all below it are taken.
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft < 1000:
        pytest.skip(f"needs a finite open-files limit of 1,000 or more, not {soft}")
    limiter, closed = ConnectionLimiter(), []
    for key in range(40):
        assert limiter.admit(key, lambda key=key: closed.append(key), descriptor=100 + key)
    assert closed == []  # far from the limit: no cap
    assert limiter.admit("near", lambda: closed.append("near"), descriptor=soft - 5)  # 4 left
    assert closed == list(range(12))  # the 12 longest idle: 16 free again
    assert limiter.cap == 29
    assert limiter.admit("next", lambda: None, descriptor=150)  # one out for one in, now
    assert closed == list(range(13))


# A server on a 64-descriptor limit and without a cap: only running out of descriptors guards it.
# argv[1]: the event loop.
EXHAUSTED_CHILD = """
import resource, sys, anyio
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from gateway.server.serving import serve_in_background
from middleware.disconnect import cancel_on_disconnect, disconnect_signal

async def hello(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

async def main():
    async with serve_in_background(hello) as server:
        print(server.port, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the test closes stdin

anyio.run(main, backend_options={"use_uvloop": sys.argv[1] == "uvloop"})
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
async def test_out_of_descriptors_logs_one_line_and_idle_connections_make_room(tmp_path, lmgate_loop) -> None:
    # Before: asyncio logged a traceback per failed accept() (130 MB of stderr in 30 s here) and
    # the fresh connection was never answered while the idle ones held every descriptor. uvloop
    # logs nothing, but libuv's EMFILE trick closed every new connection (the fresh one with it)
    # for as long as the idle ones held the descriptors.
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        process = await anyio.open_process(
            [sys.executable, "-c", EXHAUSTED_CHILD, lmgate_loop], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
    idle: list[anyio.abc.SocketStream] = []
    try:
        assert process.stdout is not None
        with anyio.fail_after(20):
            port = int(await process.stdout.receive())
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(100)]
        async with await anyio.connect_tcp("127.0.0.1", port) as fresh:
            # Generous: 16 idle connections are closed per second (asyncio's retry delay).
            assert (await get(fresh, timeout_s=30)).startswith(b"HTTP/1.1 200")
    finally:
        for stream in idle:
            await stream.aclose()
        process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()
    lines = stderr_path.read_text(errors="replace").splitlines()
    assert len(lines) <= 2, lines[:5]  # the one warning (no logging is configured in the child)
    assert "out of file descriptors" in lines[0]
