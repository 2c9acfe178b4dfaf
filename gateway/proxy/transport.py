"""The upstream transport: httpx's own, guarded against a broken upstream's leftover bytes.

httpcore (under httpx) parses responses with h11 and hands a keep-alive connection back to its
pool as soon as h11 has parsed the end of a response. Bytes the upstream sent past that end (more
than its ``Content-Length``, or a second response in the same write) stay in h11's receive
buffer, and the next request on that connection, from another client, is answered with them: one
client receives what the upstream sent to another, or fails with ``illegal status line``.

:class:`FramingGuard` closes such a connection instead. When a response is closed and h11 holds
bytes it has not parsed although the response ended, the guard tells h11 the exchange failed
(``h11.Connection.send_failed()``, public h11 API); httpcore then closes the connection rather
than pooling it. The response's chunks come from httpx's own iterator (the guard adds nothing per
chunk); the check is a few attribute reads once per response.

Bytes that arrive on the socket after the response was parsed are httpcore's own concern: a
pooled connection whose socket is readable is closed before it is reused (``has_expired``).

:func:`unread_bytes` lets the proxy ask, at the point where a body has reached the end its
framing declares, whether the upstream sent more: a body longer than its ``Content-Length`` was
cut by that header, and the client must see an error rather than a complete-looking answer.

Finding h11's connection takes httpx's and httpcore's private attributes (there is no public
view); the layout is pinned by tests/gateway/test_transport.py, and a layout the guard does not
recognise is logged once and leaves responses unguarded rather than failing requests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx

from gateway.proxy.aiohttp_transport import oversent_bytes

logger = logging.getLogger("lmgate")

__all__ = ["FramingGuard", "unread_bytes"]

_EXTENSION = "lmgate.h11"


class FramingGuard(httpx.AsyncBaseTransport):
    """Wraps an ``httpx.AsyncHTTPTransport``; see the module docstring."""

    def __init__(self, transport: httpx.AsyncHTTPTransport) -> None:
        self.transport = transport
        self.unguarded = 0  # responses whose connection the guard could not find (logged once)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.transport.handle_async_request(request)
        connection = _h11_connection(response.stream)
        if connection is None or not isinstance(response.stream, httpx.AsyncByteStream):
            self.unguarded += 1
            if self.unguarded == 1:
                logger.warning(
                    "lmgate cannot see the upstream connection's HTTP/1.1 state (httpx/httpcore changed?); "
                    "a connection the upstream over-sends on is not closed",
                    extra={"event": "framing_guard_unavailable"},
                )
            return response
        response.stream = _GuardedStream(response.stream, connection)
        response.extensions[_EXTENSION] = connection
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def unread_bytes(response: httpx.Response) -> int | None:
    """Bytes received on ``response``'s connection that h11 has not parsed; None if unknown.

    Ask only once the body reached the end its framing declares (the last byte of a
    ``Content-Length`` body, or the end of any body): from there on, every such byte is one the
    upstream sent past the end of its response.
    """
    connection = response.extensions.get(_EXTENSION)
    if not isinstance(connection, h11.Connection):
        return oversent_bytes(response)  # lmgate's aiohttp transport (the default), else None
    return len(connection.trailing_data[0])


class _GuardedStream(httpx.AsyncByteStream):
    __slots__ = ("_stream", "_connection")

    def __init__(self, stream: httpx.AsyncByteStream, connection: h11.Connection) -> None:
        self._stream = stream
        self._connection = connection

    def __aiter__(self) -> AsyncIterator[bytes]:
        # httpx's own iterator, unwrapped: the guard costs nothing per chunk.
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        connection = self._connection
        if connection.their_state is h11.DONE and connection.trailing_data[0]:
            # The response ended where its framing says, yet more bytes came: never reuse this
            # connection. our_state becomes ERROR, so httpcore closes it instead of pooling it.
            connection.send_failed()
        await self._stream.aclose()


def _h11_connection(stream: Any) -> h11.Connection | None:
    """h11's state for the connection a response of httpx's HTTP transport is read from.

    httpx's ``AsyncResponseStream`` -> httpcore's ``PoolByteStream`` -> ``HTTP11ConnectionByteStream``
    -> ``AsyncHTTP11Connection`` -> ``h11.Connection``. None for any other layout (HTTP/2 included).
    """
    pool_stream = getattr(stream, "_httpcore_stream", None)
    connection_stream = getattr(pool_stream, "_stream", None)
    connection = getattr(connection_stream, "_connection", None)
    state = getattr(connection, "_h11_state", None)
    return state if isinstance(state, h11.Connection) else None
