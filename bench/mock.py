"""A fast mock upstream: raw ``asyncio.Protocol`` HTTP/1.1, no framework on the hot path.

    python -m bench.mock [--host 127.0.0.1] [--port 0]

Prints ``mock listening on http://HOST:PORT`` on stdout once it accepts connections.

What it answers (any path not listed is a 404):

* ``POST /v1/chat/completions``: the request body carries its own script, so every proxy (lmgate,
  NGINX, LiteLLM, which all forward the messages untouched) drives it the same way:
  ``bench:chunks=50;interval_ms=20;cid=17`` anywhere in the body (the message content). With
  ``"stream": true`` the answer is an SSE stream of ``chunks`` content frames, ``interval_ms``
  apart on an absolute schedule (no drift), one HTTP chunk each, then a finish frame, a usage frame
  when ``"include_usage": true``, and ``data: [DONE]``. Without it, a small ``chat.completion``.
* ``GET /v1/models``: one model.
* ``POST /v1/traces``: an OTLP/HTTP sink (200, empty protobuf) for the tracing leg.
* ``GET /_bench/stats`` and ``POST /_bench/reset``: the counters below, as JSON.

It counts connections opened and closed, streams started, finished and cancelled, and for every
stream that ends because the peer went away before its last frame, the ``cid`` and the
``time.monotonic()`` at which the connection was seen closing (system-wide clock on Linux, so the
load generator in another process can subtract its own close times).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import socket
import sys
import time

from bench._loop import run

_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
_SCRIPT_RE = re.compile(rb"bench:([a-z_=0-9;.]*)")

_CONTENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":"tok "},"logprobs":null,"finish_reason":null}]}\n\n'
)
_FINISH = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
)
_DONE = b"data: [DONE]\n\n"


def _usage_frame(chunks: int) -> bytes:
    usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
    document = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                "model": "bench", "choices": [], "usage": usage}
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_CONTENT_CHUNK = _chunk(_CONTENT)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the mock upstream."},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    },
    separators=(",", ":"),
).encode()
_ROLE_FRAME = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hello from the mock upstream."},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)
_MODELS = b'{"object":"list","data":[{"id":"bench","object":"model","owned_by":"bench"}]}'


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status.encode(), content_type, len(body), body)


_COMPLETION_RESPONSE = _response("200 OK", _COMPLETION)
_MODELS_RESPONSE = _response("200 OK", _MODELS)
_OTLP_RESPONSE = _response("200 OK", b"", b"application/x-protobuf")
_NOT_FOUND = _response("404 Not Found", b'{"error":"not found"}')


class Stats:
    """Counters for one measurement; ``reset`` starts the next."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.conns_opened = 0
        self.conns_closed = 0
        self.streams_started = 0
        self.streams_finished = 0
        self.frames_sent = 0
        self.otlp_bytes = 0
        self.cancels: dict[str, float] = {}  # cid -> monotonic time the close was seen
        self.cancel_frames: dict[str, int] = {}
        self.started: dict[str, float] = {}  # cid -> when its stream started (paced streams)
        self.finished: dict[str, float] = {}  # cid -> when its last frame went out

    def snapshot(self, open_conns: int, active: int) -> dict[str, object]:
        return {
            "now": time.monotonic(),
            "requests": self.requests,
            "conns_opened": self.conns_opened,
            "conns_closed": self.conns_closed,
            "conns_open": open_conns,
            "streams_started": self.streams_started,
            "streams_finished": self.streams_finished,
            "streams_active": active,
            "frames_sent": self.frames_sent,
            "otlp_bytes": self.otlp_bytes,
            "cancels": self.cancels,
            "cancel_frames": self.cancel_frames,
            "started": self.started,
            "finished": self.finished,
        }


class Stream:
    """One SSE answer being written on a schedule."""

    __slots__ = ("conn", "cid", "left", "interval", "next_at", "usage", "chunks", "handle", "sent")

    handle: asyncio.Handle | None

    def __init__(self, conn: MockProtocol, cid: str, chunks: int, interval: float, usage: bool) -> None:
        self.conn = conn
        self.cid = cid
        self.chunks = chunks
        self.left = chunks
        self.interval = interval
        self.usage = usage
        self.next_at = 0.0
        self.handle = None
        self.sent = 0


class MockServer:
    def __init__(self) -> None:
        self.stats = Stats()
        self.open: set[MockProtocol] = set()
        self.active: set[Stream] = set()
        # Paced frames are due on 1 ms slots: one timer per slot serves every stream due in it
        # (1,000 streams at 20 ms make 50,000 frames a second but only 1,000 timers).
        self.slots: dict[int, list[Stream]] = {}

    def schedule(self, stream: Stream, at: float) -> None:
        slot = math.ceil(at * 1000)
        due = self.slots.get(slot)
        if due is None:
            due = self.slots[slot] = []
            loop = asyncio.get_running_loop()
            loop.call_at(slot / 1000, self._run_slot, slot)
        due.append(stream)

    def _run_slot(self, slot: int) -> None:
        for stream in self.slots.pop(slot, ()):
            stream.conn._tick(stream)


class MockProtocol(asyncio.Protocol):
    def __init__(self, server: MockServer) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.loop = asyncio.get_running_loop()

    # -- connection -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.open.add(self)
        self.server.stats.conns_opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)
        self.server.stats.conns_closed += 1
        stream = self.stream
        if stream is not None:
            self._cancelled(stream)

    def eof_received(self) -> bool:
        # A proxy closing its side mid-stream: that is the cancel; close ours too.
        stream = self.stream
        if stream is not None:
            self._cancelled(stream)
        return False

    def _cancelled(self, stream: Stream) -> None:
        stats = self.server.stats
        stats.cancels.setdefault(stream.cid, time.monotonic())
        stats.cancel_frames.setdefault(stream.cid, stream.sent)
        self._end_stream(stream)

    # -- requests ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer and self.stream is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            lines = head.split(b"\r\n")
            try:
                method, target, _ = lines[0].split(b" ", 2)
            except ValueError:
                self.transport.close()  # type: ignore[union-attr]
                return
            length = 0
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            start = end + 4
            if chunked:
                body, consumed = _dechunk(self.buffer, start)
                if body is None:
                    return
                self.buffer = self.buffer[consumed:]
            else:
                if len(self.buffer) < start + length:
                    return
                body = self.buffer[start:start + length]
                self.buffer = self.buffer[start + length:]
            self._handle(method, target.split(b"?", 1)[0], body)

    def _handle(self, method: bytes, path: bytes, body: bytes) -> None:
        stats = self.server.stats
        transport = self.transport
        assert transport is not None
        if path == b"/v1/chat/completions" and method == b"POST":
            stats.requests += 1
            if _STREAM_RE.search(body):
                self._start_stream(body)
            else:
                transport.write(_COMPLETION_RESPONSE)
        elif path == b"/v1/traces":
            stats.otlp_bytes += len(body)
            transport.write(_OTLP_RESPONSE)
        elif path == b"/v1/models":
            transport.write(_MODELS_RESPONSE)
        elif path == b"/_bench/stats":
            snapshot = stats.snapshot(len(self.server.open), len(self.server.active))
            transport.write(_response("200 OK", json.dumps(snapshot).encode()))
        elif path == b"/_bench/abort" and method == b"POST":
            # End streams a proxy never cancelled, so they do not load the next measurement.
            streams = list(self.server.active)
            for stream in streams:
                stream.conn.transport.abort()  # type: ignore[union-attr]
            transport.write(_response("200 OK", json.dumps({"aborted": len(streams)}).encode()))
        elif path == b"/_bench/reset" and method == b"POST":
            stats.reset()
            transport.write(_response("200 OK", b"{}"))
        else:
            transport.write(_NOT_FOUND)

    # -- streams ----------------------------------------------------------------------------
    def _start_stream(self, body: bytes) -> None:
        script = _script(body)
        usage = bool(_USAGE_RE.search(body))
        transport = self.transport
        assert transport is not None
        stats = self.server.stats
        stats.streams_started += 1
        chunks = int(script.get("chunks", 0))
        if chunks <= 0:
            # A non-streaming request the proxy turned into a stream (lmgate assembles these):
            # the same answer as the JSON completion, in one write.
            tail = _ROLE_FRAME + _FINISH + (_usage_frame(6) if usage else b"") + _DONE
            transport.write(_SSE_HEAD + _chunk(tail) + b"0\r\n\r\n")
            stats.streams_finished += 1
            return
        stream = Stream(self, script.get("cid", ""), chunks, float(script.get("interval_ms", 0)) / 1000, usage)
        if stream.interval > 0 and stream.cid:
            stats.started[stream.cid] = time.monotonic()
        self.stream = stream
        self.server.active.add(stream)
        transport.write(_SSE_HEAD)
        if stream.interval <= 0:
            self._burst(stream)
        else:
            stream.next_at = self.loop.time()
            self._tick(stream)

    def _burst(self, stream: Stream) -> None:
        """All frames at once, each its own write (its own TCP segment with TCP_NODELAY)."""
        write = self.transport.write  # type: ignore[union-attr]
        for _ in range(stream.chunks - 1):
            write(_CONTENT_CHUNK)
        stream.sent = stream.chunks - 1
        stream.left = 1
        self._tick(stream)

    def _tick(self, stream: Stream) -> None:
        stream.handle = None
        if self.stream is not stream:
            return
        transport = self.transport
        assert transport is not None
        stream.left -= 1
        stream.sent += 1
        if stream.left > 0:
            transport.write(_CONTENT_CHUNK)
            if stream.interval > 0:
                stream.next_at += stream.interval
                self.server.schedule(stream, stream.next_at)
            else:
                stream.handle = self.loop.call_soon(self._tick, stream)
            return
        tail = _CONTENT + _FINISH + (_usage_frame(stream.chunks) if stream.usage else b"") + _DONE
        transport.write(_chunk(tail) + b"0\r\n\r\n")
        self.server.stats.streams_finished += 1
        if stream.interval > 0 and stream.cid:
            self.server.stats.finished[stream.cid] = time.monotonic()
        self._end_stream(stream)
        if self.buffer:
            self.data_received(b"")

    def _end_stream(self, stream: Stream) -> None:
        self.server.stats.frames_sent += stream.sent
        if stream.handle is not None:
            stream.handle.cancel()
            stream.handle = None
        self.server.active.discard(stream)
        if self.stream is stream:
            self.stream = None


def _script(body: bytes) -> dict[str, str]:
    match = _SCRIPT_RE.search(body)
    if match is None:
        return {}
    pairs = (item.partition(b"=") for item in match.group(1).split(b";") if item)
    return {key.decode(): value.decode() for key, _, value in pairs}


def _dechunk(buffer: bytes, start: int) -> tuple[bytes | None, int]:
    parts = []
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None, 0
        size = int(buffer[at:line_end].split(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", at)
            if trailer_end < 0:
                return None, 0
            return b"".join(parts), trailer_end + 2
        if len(buffer) < at + size + 2:
            return None, 0
        parts.append(buffer[at:at + size])
        at += size + 2


async def serve(host: str, port: int) -> None:
    server = MockServer()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: MockProtocol(server), host, port, backlog=4096, reuse_address=True)
    bound = listener.sockets[0].getsockname()[1]
    print(f"mock listening on http://{host}:{bound}", flush=True)
    async with listener:
        await listener.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mock", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
