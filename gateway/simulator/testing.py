"""Helpers for tests that drive the simulator (ours, and users' own suites).

* :func:`parse_sse` splits raw SSE bytes into events, keeping the exact bytes of each frame.
* :class:`FrameReader` reads frames from a streaming ``httpx`` response as they arrive, so a test
  can read "the first three tokens", then hang up.
* :class:`ASGICall` calls the ASGI app in-process and records every message it sends, for
  assertions no socket can make deterministically (for example "nothing at all was sent while the
  model loaded": with a FakeClock standing still, the recorded list is exactly the headers).
"""

from __future__ import annotations

import json
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


class ASGICall:
    """One in-process request to an ASGI app, recording what the app sends.

    ``disconnect()`` makes the next ``receive()`` return ``http.disconnect``, as a server does when
    the client goes away. Run ``call()`` in a task group and inspect ``messages`` as it goes.
    """

    def __init__(self, app: ASGIApp, method: str, path: str, body: Any = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
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
