"""Helpers for tests that drive the simulator (ours, and users' own suites).

* :func:`parse_sse` splits raw SSE bytes into events, keeping the exact bytes of each frame.
* :class:`FrameReader` reads frames from a streaming ``httpx`` response as they arrive, so a test
  can read "the first three tokens", then hang up.
* :class:`BackgroundStream` runs a streaming request in a task, records frames as they arrive and
  can hang up at any moment (before headers, during the silent load, mid-generation).
* :class:`ASGICall` calls the ASGI app in-process and records every message it sends, for
  assertions no socket can make deterministically (for example "nothing at all was sent while the
  model loaded": with a FakeClock standing still, the recorded list is exactly the headers).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from middleware.types import ASGIApp, Message


@dataclass(frozen=True)
class SSEEvent:
    raw: bytes  # the frame as sent, without its terminating blank line
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def _event(frame: bytes) -> SSEEvent:
    event, data = None, []
    for line in frame.decode().split("\n"):
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return SSEEvent(frame, event, "\n".join(data))


def parse_sse(raw: bytes) -> list[SSEEvent]:
    """Every complete frame in ``raw`` (a trailing incomplete frame is ignored)."""
    frames = raw.split(b"\n\n")
    return [_event(frame) for frame in frames[:-1] if frame]


def unstamped(body: bytes) -> bytes:
    """``body`` with every ``"created"`` time set to 0, to compare two answers byte for byte:
    they are deterministic but for that stamp, and two requests may straddle a second."""
    return re.sub(rb'"created":\s*\d+', b'"created":0', body)


class FrameReader:
    """Reads SSE frames from a streaming httpx response incrementally."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._chunks: AsyncIterator[bytes] = response.aiter_raw()
        self._buffer = b""
        self.raw = b""  # every byte received so far

    async def next(self, count: int = 1) -> list[SSEEvent]:
        """The next ``count`` frames (fewer only if the stream ends)."""
        out: list[SSEEvent] = []
        while len(out) < count:
            if b"\n\n" in self._buffer:
                frame, self._buffer = self._buffer.split(b"\n\n", 1)
                out.append(_event(frame))
                continue
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                break
            self.raw += chunk
            self._buffer += chunk
        return out

    async def rest(self) -> list[SSEEvent]:
        """Every remaining frame until the stream ends."""
        return await self.next(10**9)


class BackgroundStream:
    """A streaming POST run with ``tg.start_soon(stream.run)``; the test watches and hangs up.

    ``hang_up()`` cancels the request wherever it is; httpx then closes the connection, which is
    how a client leaving looks to the server. ``hung_up_at`` (``time.monotonic()``) lets a test
    measure how fast the server noticed.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, body: Any, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.url = url
        self.body = body
        self.headers = headers or {}
        self.status: int | None = None
        self.response_headers: httpx.Headers | None = None
        self.raw = b""
        self.frames: list[SSEEvent] = []
        self.error: Exception | None = None  # a transport error (e.g. the server cut the stream)
        self.started = anyio.Event()  # headers received
        self.done = anyio.Event()  # the stream ended, failed, or was hung up
        self.hung_up_at: float | None = None
        self._scope = anyio.CancelScope()
        self._changed = anyio.Event()

    async def run(self) -> None:
        with self._scope:
            try:
                async with self.client.stream("POST", self.url, json=self.body, headers=self.headers) as response:
                    self.status, self.response_headers = response.status_code, response.headers
                    self.started.set()
                    async for chunk in response.aiter_raw():
                        self.raw += chunk
                        self.frames = parse_sse(self.raw)
                        self._notify()
            except httpx.HTTPError as exc:
                self.error = exc
        self.done.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_frames(self, count: int, timeout: float = 5.0) -> list[SSEEvent]:
        """Wait until ``count`` frames arrived (or the stream ended); return all frames so far."""
        with anyio.fail_after(timeout):
            while len(self.frames) < count and not self.done.is_set():
                await self._changed.wait()
        return self.frames

    async def wait_done(self, timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            await self.done.wait()

    def hang_up(self) -> None:
        self.hung_up_at = time.monotonic()
        self._scope.cancel()


class ASGICall:
    """One in-process request to an ASGI app, recording what the app sends.

    ``disconnect()`` makes the next ``receive()`` return ``http.disconnect``, as a server does when
    the client goes away. Run ``call()`` in a task group and inspect ``messages`` as it goes.
    """

    def __init__(
        self, app: ASGIApp, method: str, path: str, body: Any = None, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.app = app
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
            "client": None,
            "server": None,
        }
        self.body = b"" if body is None else json.dumps(body).encode()
        self.messages: list[Message] = []
        self.changed = anyio.Event()
        self._body_sent = False
        self._gone = anyio.Event()

    async def _receive(self) -> Message:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        self.messages.append(message)
        self.changed.set()
        self.changed = anyio.Event()

    async def call(self) -> None:
        await self.app(self.scope, self._receive, self._send)

    def disconnect(self) -> None:
        self._gone.set()

    @property
    def body_bytes(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
