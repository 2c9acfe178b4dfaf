"""Reading an upstream response's raw body: chunk by chunk, failures translated, ends checked.

The relay reads through :class:`UpstreamBody`: ``aiter_raw()`` (no decoding, content-encoding
intact), a transport failure raised as lmgate's error for the phase the response is in, and bytes
read ahead (an error body peeked at) put back so the relay sends them first.

A body must end where its framing says: :func:`check_end` asks the guarded transport
(:mod:`gateway.proxy.transport`) whether the upstream sent bytes past that end, and
:func:`check_json` whether a JSON answer lmgate read whole parses, :func:`check_stream_end`
whether an event stream is complete.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from gateway.proxy.aiohttp_transport import raw_chunks
from gateway.proxy.sse import FrameHold, StreamMarkers
from gateway.proxy.transport import unread_bytes
from gateway.proxy.upstream_errors import translate_transport_error
from middleware.errors import StreamCut, UpstreamProtocolError


class UpstreamBody:
    """``response``'s raw chunks, one at a time, with bytes read ahead put back in front."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        # Taken on the first read: until then the response is unread (an assembled answer reads
        # aiter_bytes()).
        self._chunks: AsyncIterator[bytes] | None = None
        self._ahead = b""

    async def next(self, *, started: bool, frames: FrameHold | None = None) -> bytes:
        """The next chunk, b"" at the end; transport failures translated for the current phase.

        ``started``: the response to the client has started. ``frames``: the event stream's hold,
        whose partial frame a cut drops (the error says so).
        """
        if self._ahead:
            ahead, self._ahead = self._ahead, b""
            return ahead
        if self._chunks is None:
            self._chunks = raw_chunks(self.response)
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return b""
        except httpx.HTTPError as exc:
            error = translate_transport_error(exc, response_started=started)
            if frames is not None and frames.pending:
                error = StreamCut(f"{error.message} {dropped(frames.pending)}")
            raise error from exc

    def put_back(self, data: bytes) -> None:
        """Relay ``data`` (read ahead, before the response started) ahead of the next chunk."""
        self._ahead = data

    async def read_up_to(self, first: bytes, *, limit: int) -> tuple[bytes, bool]:
        """Read on from ``first`` until the end or past ``limit`` bytes: what was read, and whether
        that was the whole body."""
        parts = [first]
        size = len(first)
        while size <= limit:
            chunk = await self.next(started=False)
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts), False

    @property
    def content_length(self) -> int | None:
        value = self.response.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None


def dropped(held: int) -> str:
    return f"Its last frame arrived only in part; those {held} bytes were dropped, not sent."


def check_end(response: httpx.Response, *, cut: bool = False) -> None:
    """Raise if the upstream sent bytes past the end its framing declared for ``response``.

    Call once the body reached that end. A ``Content-Length`` shorter than the body sent means the
    answer was cut by its own header. ``cut``: the response has started as an event stream.
    """
    extra = unread_bytes(response)
    if not extra:
        return
    declared = response.headers.get("content-length")
    framing = f"its Content-Length ({declared} bytes)" if declared is not None else "its framing"
    message = (
        f"The upstream's answer (HTTP {response.status_code}) is cut: {extra} more bytes came after the end "
        f"{framing} declared."
    )
    raise StreamCut(message) if cut else UpstreamProtocolError(message)


def check_stream_end(response: httpx.Response, frames: FrameHold, markers: StreamMarkers | None) -> None:
    """Raise if an event stream that ended where its framing says is incomplete: cut inside a
    frame (``frames`` holds part of one), or, on a route whose streams end with ``[DONE]``
    (``markers``), ended without it and without an error; or the upstream sent more past its end."""
    if markers is not None and (markers.done or markers.error):
        return
    if frames.pending:
        without_done = " without `data: [DONE]`" if markers is not None else ""
        raise StreamCut(f"The upstream ended the stream inside a frame{without_done}. {dropped(frames.pending)}")
    if markers is not None:
        raise StreamCut("The upstream ended the stream without `data: [DONE]`; the answer is incomplete.")
    check_end(response, cut=True)


def check_json(body: bytes, status: int) -> None:
    """Raise if a JSON answer lmgate read whole does not parse: it was cut, or is not JSON."""
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpstreamProtocolError(
            f"The upstream's JSON answer (HTTP {status}, {len(body)} bytes) does not parse; it is incomplete "
            f"or not JSON: {exc}"
        ) from exc
