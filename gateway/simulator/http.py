"""One HTTP exchange in LM Studio's manner: Express headers, JSON bodies, unbuffered SSE.

LM Studio serves HTTP with Express, so every response carries ``X-Powered-By: Express`` and the
CORS headers, JSON bodies carry Express's weak ``ETag``, and streams go out as
``text/event-stream`` with ``Cache-Control: no-cache`` and no ``X-Accel-Buffering``. Each SSE frame
is one ``http.response.body`` message sent when it is produced: nothing is buffered.

The exchange also watches ``receive()`` for ``http.disconnect`` (independently of writes, since
hypercorn silently drops writes after a disconnect) and can misbehave on purpose: pace the body one
byte at a time, end the connection mid-body, or close the TCP connection without answering.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
from typing import Any, cast

import anyio

from gateway.simulator.clock import Clock, sleep
from gateway.simulator.counters import Counters
from gateway.simulator.errors import SimError
from gateway.simulator.signals import Signals
from middleware.types import Receive, Scope, Send

log = logging.getLogger("gateway.simulator")

DISCONNECT_LINE = (
    "[LM STUDIO SERVER] Client disconnected. Stopping generation... "
    "(If the model is busy processing the prompt, it will finish first.)"
)

EXPRESS_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-powered-by", b"Express"),
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-headers", b"*"),
)
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    *EXPRESS_HEADERS,
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
)
JSON_TYPE = b"application/json; charset=utf-8"


class EndWithoutAnswer(Exception):
    """Leave the ASGI app without completing the response: the server drops the connection."""


def to_json(value: Any) -> bytes:
    """Serialise like JavaScript's ``JSON.stringify``: compact, UTF-8, integral floats without ``.0``."""
    return json.dumps(_js(value), separators=(",", ":"), ensure_ascii=False).encode()


def _js(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _js(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_js(v) for v in value]
    return value


def express_etag(body: bytes) -> bytes:
    """Express's default weak ETag: ``W/"<length hex>-<base64 sha1, 27 chars>"``."""
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()[:27]
    return f'W/"{len(body):x}-{digest}"'.encode()


class Exchange:
    """The response side of one request, plus its disconnect watcher."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, *, clock: Clock, counters: Counters) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self._receive = receive
        self._send = send
        self._clock = clock
        self._counters = counters
        self.signals = Signals()
        self.started = False  # http.response.start has gone out
        self.finished = False
        self.streaming = False  # the response is an SSE stream
        self.byte_delay_s: float | None = None  # slow_bytes fault: one byte per message, this far apart
        self.was_reset = False  # we closed the connection ourselves (reset fault)

    def header(self, name: bytes) -> str | None:
        for key, value in self.scope.get("headers", []):
            if key.lower() == name:
                return bytes(value).decode("latin-1")
        return None

    async def read_body(self) -> bytes:
        chunks = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._noticed_disconnect()
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    async def watch_disconnect(self) -> None:
        """Run for the whole request: notice the client leaving at once, whatever phase we are in."""
        if self.signals.has_left:
            return
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._noticed_disconnect()

    def _noticed_disconnect(self) -> None:
        if self.signals.has_left:
            return
        self.signals.client_left()
        if self.finished or self.was_reset:
            return  # the response was complete, or we hung up ourselves: not a client leaving early
        self._counters.disconnect_times.append(self.signals.left_at or 0.0)
        self._counters.disconnects += 1
        if self.streaming:
            log.info(DISCONNECT_LINE)

    async def _raw_send(self, message: dict[str, Any]) -> None:
        try:
            await self._send(message)
        except OSError:
            # Servers other than hypercorn raise on writes after a disconnect; it means the same.
            self._noticed_disconnect()

    async def start(self, status: int, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        self.started = True
        await self._raw_send({"type": "http.response.start", "status": status, "headers": list(headers)})

    async def write(self, data: bytes) -> None:
        """One body message with ``more_body=True`` (or one per byte under ``slow_bytes``)."""
        if self.byte_delay_s is None:
            await self._raw_send({"type": "http.response.body", "body": data, "more_body": True})
            return
        for index in range(len(data)):
            if index:
                # Bytes for a client that left go nowhere: stop pacing them at once, so the
                # generation loop notices the disconnect now rather than after the whole frame.
                with self.signals.phase(on_disconnect=True):
                    await sleep(self._clock, self.byte_delay_s)
            if self.signals.has_left:
                return
            await self._raw_send({"type": "http.response.body", "body": data[index : index + 1], "more_body": True})

    async def finish(self, data: bytes = b"") -> None:
        if data:
            await self.write(data)
        self.finished = True
        await self._raw_send({"type": "http.response.body", "body": b"", "more_body": False})

    async def start_sse(self) -> None:
        self.streaming = True
        await self.start(200, SSE_HEADERS)

    async def respond(self, status: int, body: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """A complete JSON response (``body`` bytes are sent as they are, for broken-JSON faults)."""
        data = body if isinstance(body, bytes) else to_json(body)
        await self.start(
            status,
            (
                *EXPRESS_HEADERS,
                *headers,
                (b"content-type", JSON_TYPE),
                (b"content-length", str(len(data)).encode()),
                (b"etag", express_etag(data)),
            ),
        )
        await self.finish(data)

    async def respond_error(self, error: SimError) -> None:
        await self.respond(error.status, error.body, error.headers)

    async def wait_until_client_leaves(self) -> None:
        await self.signals.left.wait()

    def reset(self, *, rst: bool = False) -> bool:
        """Close the TCP connection under the server's feet, without an HTTP answer.

        ASGI has no message for this, so the asyncio transport is found by the connection's two
        addresses (``scope["client"]``/``scope["server"]``). True if it was found and closed; False
        when the app is not behind an asyncio socket server (then the caller falls back to ending
        the response early). ``rst`` sends a TCP reset instead of a FIN.
        """
        transport = _find_transport(self.scope)
        if transport is None:
            return False
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.was_reset = True
        transport.abort()
        return True


def _find_transport(scope: Scope) -> asyncio.Transport | None:
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return None
    try:
        # private to asyncio's selector loop (uvloop has none): probed for, not relied on
        transports = getattr(asyncio.get_running_loop(), "_transports", None)
    except RuntimeError:  # no running loop
        return None
    if transports is None:
        return None
    for transport in list(transports.values()):
        try:
            peer = transport.get_extra_info("peername")
            local = transport.get_extra_info("sockname")
        except Exception:  # a transport closing under us is simply not ours
            continue
        if peer and local and tuple(peer[:2]) == tuple(client) and tuple(local[:2]) == tuple(server):
            return cast(asyncio.Transport, transport)
    return None


async def run_watched(exchange: Exchange, handler: Any) -> None:
    """Run ``handler()`` with the exchange's disconnect watcher beside it."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(exchange.watch_disconnect)
        try:
            await handler()
        except EndWithoutAnswer:
            pass  # returning with the body unfinished makes the server cut the connection
        finally:
            tg.cancel_scope.cancel()
