"""Shared fixtures: anyio on asyncio, real servers on free 127.0.0.1 ports."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from gateway.server.serving import serve_in_background
from middleware.types import Receive, Scope, Send

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["asyncio", "uvloop"])
def lmgate_loop(request: pytest.FixtureRequest) -> str:
    """Each event loop ``lmgate serve`` runs on (``listen.event_loop``), for tests that must hold on both.

    A subprocess test passes it as ``LMGATE_LISTEN__EVENT_LOOP``; an in-process module overrides
    ``anyio_backend`` to ``("asyncio", {"use_uvloop": lmgate_loop == "uvloop"})``.
    """
    return str(request.param)


class ScriptedUpstream:
    """A stand-in upstream whose behaviour each test scripts with ``handler``.

    It records every request (scope and body) and notices disconnects, so a test can assert what
    the gateway sent and that it hung up. Handlers must not call ``receive`` (a watcher does); a
    handler that streams until the client leaves waits on ``disconnected``. Used for proxy unit tests; behaviour-level tests use the
    LM Studio simulator.
    """

    def __init__(self) -> None:
        self.url = ""
        self.handler: Handler | None = None
        self.requests: list[tuple[Scope, bytes]] = []
        self.disconnected = anyio.Event()
        self.disconnect_time: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append((scope, body))
        assert self.handler is not None, "the test did not script the upstream"

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnect_time = anyio.current_time()
            self.disconnected.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await self.handler(scope, receive, send)
            tg.cancel_scope.cancel()


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    scripted = ScriptedUpstream()
    async with serve_in_background(scripted) as server:
        scripted.url = server.url
        yield scripted


@dataclass(frozen=True)
class RawRequest:
    connection: int  # which upstream connection carried it: 1 for the first accepted, and so on
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


RawAnswer = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """An upstream written byte by byte: a broken server no HTTP library would let a test write.

    ``answer(request, writer)`` writes whatever the test wants (more than its ``Content-Length``,
    half a frame, a bad chunk header) and may close the writer; otherwise the connection stays open
    for the next request (keep-alive). Model listings (``GET /api/...``, what lmgate's model layer
    asks) are answered with an empty list, so the model layer forwards requests untouched. The
    class's static methods build the usual pieces. Tests assert only what clients see, so they do
    not depend on the HTTP library lmgate uses underneath.
    """

    def __init__(self) -> None:
        self.url = ""
        self.answer: RawAnswer | None = None
        self.requests: list[RawRequest] = []
        self.connections = 0
        self.closed_early = 0  # writes that failed because the peer (lmgate) had closed
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # cancelled on exit: a handler waits for a next request that never comes
        task.add_done_callback(self._tasks.discard)
        self.connections += 1
        number = self.connections
        try:
            while not writer.is_closing():
                request = await _read_request(reader, number)
                if request is None:
                    return
                self.requests.append(request)
                if request.method == "GET" and request.path.startswith("/api/"):
                    writer.write(self.response(b'{"data":[]}'))
                else:
                    assert self.answer is not None, "the test did not script the raw upstream"
                    await self.answer(request, writer)
                if not writer.is_closing():
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_early += 1
        finally:
            writer.close()

    @staticmethod
    def response(body: bytes, *, content_type: bytes = b"application/json", content_length: int | None = None,
                 status: bytes = b"200 OK") -> bytes:
        """A whole response whose ``Content-Length`` is ``content_length`` (default: the truth)."""
        length = len(body) if content_length is None else content_length
        return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
                + b"\r\ncontent-length: " + str(length).encode() + b"\r\n\r\n" + body)

    @staticmethod
    def chunked_head(content_type: bytes = b"text/event-stream") -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ntransfer-encoding: chunked\r\n\r\n"

    @staticmethod
    def chunk(data: bytes) -> bytes:
        return b"%x\r\n" % len(data) + data + b"\r\n"

    LAST_CHUNK = b"0\r\n\r\n"


async def _read_request(reader: asyncio.StreamReader, connection: int) -> RawRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawRequest(connection, method, target, headers, body)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    async with RawUpstream() as raw:
        yield raw


# --- a real redis-server (Debian's package) for the shared-state tests -------------------------------


@dataclass
class RedisServer:
    """``redis-server`` on 127.0.0.1 with nothing persisted, in the test's temp directory.

    ``stop()`` and ``start()`` again on the same port stand for an outage and a restart (its data
    is gone, as with a Redis without persistence); ``url`` stays the same.
    """

    binary: str
    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        for _ in range(3):  # a free port may be taken before redis-server binds it
            self.port = self.port or _free_port()
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._answers():
                return
            self.stop()
            self.port = 0
        raise RuntimeError(f"redis-server did not start:\n{(self.directory / 'redis.log').read_text(errors='replace')}")

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung or swapping Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused one too
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None

    def _answers(self, timeout: float = 10.0) -> bool:
        """Bounded poll until the server answers PING; False if it exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout} s")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_bin() -> str:
    binary = shutil.which("redis-server") or next(
        (path for path in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(path, os.X_OK)), None
    )
    if binary is None:
        reason = "redis-server is not installed (CI installs it: apt-get install -y redis-server)"
        if os.environ.get("CI") or os.environ.get("LMGATE_REQUIRE_REDIS"):
            pytest.fail(reason + "; CI/LMGATE_REQUIRE_REDIS is set, so it is required", pytrace=False)
        pytest.skip(reason)
    return binary


@pytest.fixture
def redis_server(redis_bin: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for the test (stopped after it)."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(redis_bin, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
