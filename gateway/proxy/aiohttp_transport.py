"""An httpx transport over aiohttp's I/O: httpx stays the upstream client's API, aiohttp moves the bytes.

httpcore and h11 (under httpx's own transport) handle every HTTP chunk as a separate event in pure
Python; aiohttp parses HTTP in C and hands over whatever the socket delivered. lmgate keeps
``httpx.AsyncClient`` as its upstream API (its timeouts, its errors, and
opentelemetry-instrumentation-httpx's span per upstream request) and runs it on
:class:`AiohttpTransport`, one ``aiohttp.ClientSession`` created lazily inside the running loop.

What it keeps of httpx's transport, and how:

* Raw bytes as they arrive: a response body is ``content.readany()`` chunks, with
  ``auto_decompress=False`` (a content-encoding stays intact, as with ``aiter_raw``): no
  re-chunking, no waiting to fill a buffer.
* Nothing of aiohttp's own on the wire or in state: no cookie jar (an upstream ``Set-Cookie`` must
  never reach another client's request), no environment proxies, no redirects, none of aiohttp's
  automatic headers where the httpx request carries none.
* Pool limits from ``httpx.Limits``: ``max_connections`` bounds the connections in use (None:
  unbounded), ``keepalive_expiry`` is aiohttp's ``keepalive_timeout``. ``max_keepalive_connections``,
  which aiohttp lacks, is kept by :class:`_Connector`: a connection released while that many are
  idle is closed, as httpcore does, so a burst leaves no more than that many open.
* Idle connections reused as httpcore reuses them (:class:`_Connector`): the most recently used
  first, so under a light load the others reach their expiry and close. aiohttp hands out the one
  idle longest, and then a steady trickle of requests keeps every connection a burst opened alive.
* Timeouts from the request's ``timeout`` extension: ``connect`` is the TCP connect only
  (``httpx.ConnectTimeout``), ``read`` bounds each read (``httpx.ReadTimeout``), ``pool`` bounds the
  wait for a connection when ``max_connections`` are all in use (``httpx.PoolTimeout``). The pool
  wait is this transport's own semaphore, so it is never confused with a slow connect: aiohttp's
  ``ClientTimeout.connect`` covers both.
* Errors as httpcore words them where lmgate reads the wording (gateway/proxy/upstream_errors.py):
  a peer closing before the response is ``RemoteProtocolError("Server disconnected without
  sending a response.")``, closing inside the body ``RemoteProtocolError("peer closed connection
  without sending complete message body: ...")``; a malformed status line or chunk header is a
  ``RemoteProtocolError`` that says neither; a reset is ``ReadError``; a refused connect
  ``ConnectError``.
* A response closed before its end closes its connection (the upstream sees the disconnect at
  once); a finished one hands it back for reuse.
* The framing guard: bytes the upstream sent past the end of a response (beyond its
  ``Content-Length``, after its last chunk, or arriving before the next request) mark the
  connection to be closed, never reused, and :func:`unread_bytes` reports how many there were.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from time import monotonic
from typing import Any

import aiohttp
import httpx
from aiohttp import helpers
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

__all__ = ["AiohttpTransport", "oversent_bytes", "pool_counts"]

EXTENSION = "lmgate.aiohttp"

# Headers aiohttp adds on its own when a request lacks them; httpx's request carries what it sends.
_AUTO_HEADERS = ("Host", "Accept", "Accept-Encoding", "User-Agent", "Content-Type", "Connection")

_HEAD_LIMIT = 65536  # the bytes of a response head scanned for its end (aiohttp refuses longer heads)


class _Protocol(ResponseHandler):
    """aiohttp's protocol, holding back from its parser what the upstream sent past a response's end.

    aiohttp's parser reads on past the end of a response: a second response in the same read is
    queued for the next request, and bytes that are no response fail the whole read, the complete
    response before them included. So the read that holds the end of a response is split there:
    the parser gets the response, the rest is counted (``lmgate_extra``) and the connection marked
    to be closed. The end is found from the head (once per response, the head's own bytes): for a
    ``Content-Length`` body its offset; for a chunked one the first last-chunk line in the read,
    tried and checked (if the body had not ended there, the rest is fed on as usual).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.lmgate_extra = 0  # bytes past the end of the current response
        self._lmgate_done = True  # the current response ended (or none was asked for)
        self._lmgate_stale: object = None  # the previous response's payload
        self._lmgate_received = 0  # bytes of the current response so far
        self._lmgate_head: bytearray | None = None  # the head, until its end is found
        self._lmgate_end: int | None = None  # where a Content-Length response ends
        self._lmgate_chunked = False

    def set_response_params(self, **kwargs: Any) -> None:
        # A new request on this connection: its response starts with the next byte.
        self.lmgate_extra = 0
        self._lmgate_done = False
        self._lmgate_stale = self._payload
        self._lmgate_received = 0
        self._lmgate_head = bytearray()
        self._lmgate_end = None
        self._lmgate_chunked = False
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        if self._lmgate_done:
            # Bytes between the end of a response and the next request belong to no request.
            if not data:
                super().data_received(data)  # aiohttp resuming its parser on what it held back
                return
            self.lmgate_extra += len(data)
            self._should_close = True
            if self._ended() and self.transport is not None:
                self.transport.close()  # it may be idle in the pool already: never reuse it
            return
        before = self._lmgate_received
        self._lmgate_received += len(data)
        if self._lmgate_head is not None:
            self._read_head(data)
        end = self._lmgate_end
        if end is not None and self._lmgate_received > end:
            # Past the declared length: the parser gets the response, never what follows (it may
            # hold part of the body back for flow control and finish it later, on an empty read).
            within = max(0, end - before)
            self._lmgate_done = True
            self.lmgate_extra = len(data) - within
            self._should_close = True
            super().data_received(data[:within])
            return
        cut: int | None = None
        if self._lmgate_chunked:
            at = data.find(b"\r\n0\r\n\r\n")
            cut = at + 7 if at >= 0 else (5 if data.startswith(b"0\r\n\r\n") else None)
        if cut is not None and cut < len(data):
            # aiohttp hands the connection back to its pool the moment the body ends, inside this
            # call, if it should not close: mark it first, unmark if the body did not end there.
            should_close, self._should_close = self._should_close, True
            super().data_received(data[:cut])
            if self._ended():
                self._lmgate_done = True
                self.lmgate_extra = len(data) - cut
                return
            self._should_close = should_close
            data = data[cut:]
        super().data_received(data)
        if self._ended():
            self._lmgate_done = True

    def _ended(self) -> bool:
        payload = self._payload
        return payload is not None and payload is not self._lmgate_stale and payload.is_eof()

    def _read_head(self, data: bytes) -> None:
        head = self._lmgate_head
        assert head is not None
        start = max(0, len(head) - 3)
        head += data
        end = head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(head) > _HEAD_LIMIT:
                self._lmgate_head = None  # aiohttp refuses it anyway
            return
        self._lmgate_head = None
        lines = bytes(head[:end]).lower().split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1].startswith(b"1"):
            return  # an informational response first: the end is left to aiohttp's parser
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip()
            if name == b"transfer-encoding" and b"chunked" in value:
                self._lmgate_chunked = True
                self._lmgate_end = None
            elif name == b"content-length" and value.strip().isdigit() and not self._lmgate_chunked:
                self._lmgate_end = end + 4 + int(value.strip())


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, handing out idle connections as httpcore does (private hooks).

    aiohttp reuses the connection idle longest (its idle list is first in, first out), so requests
    coming faster than ``keepalive_timeout / n`` keep all n connections a burst opened alive for
    good: a quiet lmgate polled by a health check held several. Here the most recently used one is
    taken and those idle past their expiry are closed first, as httpcore does: a trickle of requests
    keeps one connection, the rest expire. aiohttp's cleanup timer then runs every
    ``keepalive_timeout``, which lets a connection idle up to twice that; here it runs at the next
    expiry.
    """

    def __init__(self, *, max_idle: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_idle = max_idle

    def _release(self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        # httpx.Limits.max_keepalive_connections, which aiohttp has no setting for: past it, close.
        if self._max_idle is not None and self.idle() >= self._max_idle:
            should_close = True
        super()._release(key, protocol, should_close=should_close)

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        conns = self._conns.get(key)
        if conns:
            self._close_expired(key, conns)
            if conns:
                conns.rotate(1)  # oldest first by release: the most recent to the front, where aiohttp takes from
            else:
                del self._conns[key]
        return await super()._get(key, traces)

    def _close_expired(self, key: ConnectionKey, conns: deque[tuple[ResponseHandler, float]]) -> None:
        timeout = self._keepalive_timeout
        if timeout is None:
            return
        deadline = monotonic() - timeout
        while conns and conns[0][1] < deadline:
            protocol, _ = conns.popleft()
            transport = protocol.transport
            protocol.close()
            if key.is_ssl and not self._cleanup_closed_disabled:
                self._cleanup_closed_transports.append(transport)  # as aiohttp does for TLS

    def _cleanup(self) -> None:
        super()._cleanup()
        timeout = self._keepalive_timeout
        if not self._conns or timeout is None:
            return
        # aiohttp checks again a whole keepalive_timeout later: check at the next expiry instead.
        oldest = min(used for conns in self._conns.values() for _, used in conns)
        if self._cleanup_handle is not None:
            self._cleanup_handle.cancel()
        self._cleanup_handle = helpers.weakref_handle(
            self,
            "_cleanup",
            max(oldest + timeout - monotonic(), 0.001),  # never 0: aiohttp schedules nothing for 0
            self._loop,
            timeout_ceil_threshold=self._timeout_ceil_threshold,
        )

    def idle(self) -> int:
        """The idle connections kept for reuse."""
        return sum(len(conns) for conns in self._conns.values())

    def acquired(self) -> int:
        """The connections carrying a request."""
        return len(self._acquired)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` over one ``aiohttp.ClientSession``; see the module docstring."""

    def __init__(self, limits: httpx.Limits | None = None, *, ssl_context: ssl.SSLContext | bool = True) -> None:
        limits = httpx.Limits() if limits is None else limits
        self.limits = limits
        self._ssl = ssl_context
        limit = limits.max_connections
        self._slots = asyncio.Semaphore(limit) if limit else None
        self._session: aiohttp.ClientSession | None = None
        self.in_use = 0  # requests holding a connection or waiting for one

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            loop = asyncio.get_running_loop()
            expiry = self.limits.keepalive_expiry
            connector = _Connector(
                max_idle=self.limits.max_keepalive_connections,
                limit=self.limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=15.0 if expiry is None else expiry,
                ssl=self._ssl,
            )
            # aiohttp's own protocol, counting what comes past a response's end (private hook).
            connector._factory = functools.partial(_Protocol, loop=loop)  # type: ignore[assignment]
            session = self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        slots = self._slots
        self.in_use += 1
        held = False
        try:
            if slots is not None:
                try:
                    async with asyncio.timeout(timeouts.get("pool")):
                        await slots.acquire()
                except TimeoutError:
                    raise httpx.PoolTimeout("No connection came free in the pool in time.") from None
                held = True
            response = await self._send(request, timeouts)
        except BaseException:
            self.in_use -= 1
            if held and slots is not None:
                slots.release()
            raise
        # The response's protocol (private): aiohttp lets go of the connection when the body ends,
        # which for a short body is before the response is returned.
        protocol = getattr(response, "_protocol", None)
        stream = _Body(response, protocol if isinstance(protocol, _Protocol) else None, self, slots if held else None)
        return httpx.Response(
            status_code=response.status,
            headers=[(bytes(k), bytes(v)) for k, v in response.raw_headers],
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode(), EXTENSION: stream},
        )

    async def _send(self, request: httpx.Request, timeouts: dict[str, float | None]) -> aiohttp.ClientResponse:
        session = self._open()
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.raw:
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        skip = [name for name in _AUTO_HEADERS if name not in headers]
        body = await request.aread()
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=timeouts.get("connect"), sock_read=timeouts.get("read")
        )
        try:
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                skip_auto_headers=skip,
                data=body or None,
                allow_redirects=False,
                timeout=timeout,
                compress=None,
                chunked=None,
            )
        except aiohttp.ClientError as exc:
            raise _translate(exc, body_started=False) from exc
        return response

    def connections_in_use(self) -> int:
        """Requests holding an upstream connection or waiting for one (tests)."""
        return self.in_use

    def connections(self) -> tuple[int, int]:
        """The upstream connections open now: (carrying a request, idle in the pool); /metrics."""
        session = self._session
        connector = session.connector if session is not None else None
        if not isinstance(connector, _Connector) or connector.closed:
            return 0, 0
        return connector.acquired(), connector.idle()

    async def close_idle(self) -> None:
        """Close the pooled idle connections (tests count file descriptors without them)."""
        session = self._session
        if session is None or session.connector is None:
            return
        conns = session.connector._conns  # the idle connections by host (private: no public view)
        for key in list(conns):
            for protocol, _ in conns.pop(key, ()):
                protocol.close()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _Body(httpx.AsyncByteStream):
    """A response body: aiohttp's chunks as they arrive, errors in httpx's terms."""

    __slots__ = ("_response", "_protocol", "_transport", "_slots", "_closed", "received")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        protocol: _Protocol | None,
        transport: AiohttpTransport,
        slots: asyncio.Semaphore | None,
    ) -> None:
        self._response = response
        self._protocol = protocol  # kept: aiohttp lets go of the connection when the body ends
        self._transport = transport
        self._slots = slots
        self._closed = False
        self.received = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._response.content.readany()
        except aiohttp.ClientError as exc:
            raise _translate(exc, body_started=True, received=self.received, response=self._response) from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "The upstream sent nothing within the read timeout.") from exc
        if not chunk:
            raise StopAsyncIteration
        self.received += len(chunk)
        return chunk

    def unread(self) -> int | None:
        return self._protocol.lmgate_extra if self._protocol is not None else None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        response = self._response
        try:
            content = response.content
            protocol = self._protocol
            if content.at_eof() and (protocol is None or not protocol.lmgate_extra):
                response.release()  # the whole response was read: the connection may serve another
            else:
                response.close()  # unfinished, or the upstream over-sent: close the connection
        finally:
            self._transport.in_use -= 1
            if self._slots is not None:
                self._slots.release()


def raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """``response``'s raw chunks: straight from :class:`AiohttpTransport`'s body when it is one.

    ``aiter_raw()`` passes every chunk through two async generators and a chunker (httpx's
    response and its bound stream), about 6 us a chunk for nothing a relay needs. The response is
    still closed through httpx (``aclose()``), which closes this body. Any other transport's
    response is read with ``aiter_raw()``.
    """
    stream = response.extensions.get(EXTENSION)
    if isinstance(stream, _Body) and not response.is_stream_consumed:
        response.is_stream_consumed = True  # read here: httpx refuses a second reader
        return stream
    return response.aiter_raw()


def oversent_bytes(response: httpx.Response) -> int | None:
    """Bytes the upstream sent past the end of ``response``, for :class:`AiohttpTransport`; else None."""
    stream = response.extensions.get(EXTENSION)
    return stream.unread() if isinstance(stream, _Body) else None


def pool_counts(client: httpx.AsyncClient) -> Callable[[], tuple[int, int]] | None:
    """:meth:`AiohttpTransport.connections` of ``client``'s transport, if it is one (for /metrics)."""
    transport = client._transport  # httpx has no public view of a client's transport
    return transport.connections if isinstance(transport, AiohttpTransport) else None


def _translate(
    exc: aiohttp.ClientError,
    *,
    body_started: bool,
    received: int = 0,
    response: aiohttp.ClientResponse | None = None,
) -> httpx.TransportError:
    """The httpx exception httpcore raises for the failure aiohttp reports as ``exc``."""
    text = str(exc)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text or "The connect timed out.")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(text or "The upstream sent nothing within the read timeout.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        if body_started:
            return _peer_closed(received, response)
        return httpx.RemoteProtocolError("Server disconnected without sending a response.")
    if isinstance(exc, aiohttp.ClientPayloadError):
        cause = exc.__cause__ if exc.__cause__ is not None else exc.__context__
        if _is_eof(exc):
            return _peer_closed(received, response)
        return httpx.RemoteProtocolError(f"malformed response body: {cause or text}")
    if isinstance(exc, aiohttp.ClientOSError):
        return httpx.ReadError(text)
    if isinstance(exc, aiohttp.ClientResponseError):
        # A malformed status line or header: the upstream answered, not in HTTP.
        return httpx.RemoteProtocolError(f"malformed response: {exc.message}")
    if isinstance(exc, aiohttp.ClientConnectionError):
        return httpx.ReadError(text)
    return httpx.RemoteProtocolError(text)


def _is_eof(exc: aiohttp.ClientPayloadError) -> bool:
    """Whether a payload error is the connection ending inside the body (not a malformed body)."""
    text = str(exc)
    return "Response payload is not completed" in text or "Not enough data" in text


def _peer_closed(received: int, response: aiohttp.ClientResponse | None) -> httpx.RemoteProtocolError:
    expected = response.headers.get("content-length") if response is not None else None
    detail = f"received {received} bytes, expected {expected}" if expected else f"received {received} bytes"
    return httpx.RemoteProtocolError(f"peer closed connection without sending complete message body ({detail})")
