"""Server-sent events: the little lmgate needs to know about frames.

The relay never decodes frames on the hot path: it scans bytes for the few markers it needs
(`[DONE]`, `event: error`) and for frame ends, so it passes whole frames only
(:class:`FrameHold`). Full parsing (:class:`FrameParser`) is only for the non-streaming assembly
path, where the whole stream is consumed by lmgate anyway.

Every scanner here does work linear in the bytes it is fed, however they are chunked: each
chunk is searched once (plus the few bytes before it a marker or a blank line may straddle),
and a frame being collected is never copied again per chunk. A hostile upstream sending one
huge ``data:`` line a byte at a time costs what the bytes cost, and no more than one frame of
``max_frame_bytes`` (``limits.frame_bytes``) is ever held: past it the stream is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from middleware.errors import UpstreamProtocolError

DONE_MARKER = b"data: [DONE]"
ERROR_EVENT_MARKER = b"event: error"
#: The largest single frame lmgate holds or parses by default (``limits.frame_bytes``).
DEFAULT_FRAME_BYTES = 8 * 1024 * 1024
# Longest marker minus one: what must be kept from the previous chunk so a split marker is seen.
_TAIL = max(len(DONE_MARKER), len(ERROR_EVENT_MARKER)) - 1


class FrameTooLarge(UpstreamProtocolError):
    """A single event frame grew past the configured bound before its blank line arrived."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The upstream sent an event frame larger than limits.frame_bytes ({limit} bytes); "
            "lmgate refuses it rather than hold it."
        )


class StreamMarkers:
    """Watches relayed chunks for the end-of-stream and error markers, across chunk splits."""

    __slots__ = ("done", "error", "_tail")

    def __init__(self) -> None:
        self.done = False
        self.error = False
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        # One copy of the chunk with the previous tail in front (linear; for the usual chunk of one
        # frame this is cheaper than searching the chunk and the seam apart).
        window = self._tail + chunk
        if not self.done and DONE_MARKER in window:
            self.done = True
        if not self.error and ERROR_EVENT_MARKER in window:
            self.error = True
        self._tail = window[-_TAIL:]


class FrameHold:
    """Passes on whole frames only: a trailing partial frame is held until its blank line arrives.

    A client can act on nothing before a frame's blank line anyway, and a half frame sent before
    lmgate's own error frame (on a cut) would make the client's parser fail on broken JSON instead
    of raising lmgate's error. Whole frames go out at once; the held part goes out with the chunk
    that completes it. Per chunk: one ``endswith`` when the chunk ends a frame (LM Studio writes
    one frame per chunk), else a search of the new bytes only.
    """

    __slots__ = ("limit", "_held")

    def __init__(self, limit: int = DEFAULT_FRAME_BYTES) -> None:
        self.limit = limit
        self._held = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of a partial frame held back (dropped if the stream ends now)."""
        return len(self._held)

    def feed(self, chunk: bytes) -> bytes:
        """The whole frames ``chunk`` completes (possibly b""), held bytes first."""
        held = self._held
        if not held:
            if chunk.endswith(b"\n\n") or chunk.endswith(b"\r\n\r\n"):
                return chunk
            end = _frames_end(chunk, 0)
            if end < len(chunk):
                self._hold(chunk[end:] if end else chunk)
                return chunk[:end]
            return chunk
        # A blank line may straddle the seam: search from two bytes before the new ones.
        start = max(0, len(held) - 2)
        held += chunk
        end = _frames_end(held, start)
        if end == 0:
            if len(held) > self.limit:
                raise FrameTooLarge(self.limit)
            return b""
        out = bytes(held[:end])
        del held[:end]
        if len(held) > self.limit:
            raise FrameTooLarge(self.limit)
        return out

    def _hold(self, partial: bytes) -> None:
        if len(partial) > self.limit:
            raise FrameTooLarge(self.limit)
        self._held += partial


def _frames_end(data: bytes | bytearray, start: int) -> int:
    """The index just past the last blank line (``\\n\\n`` or ``\\n\\r\\n``) at or after ``start``; 0 if none."""
    lf = data.rfind(b"\n\n", start)
    crlf = data.rfind(b"\n\r\n", start)
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


@dataclass(frozen=True)
class Frame:
    event: str | None
    data: str


class FrameParser:
    """Incremental SSE parser (WHATWG rules, simplified: no ids or retry fields needed).

    Linear in its input: each piece of text is searched once for a blank line, and the pieces of
    a frame still open are kept in a list and joined once, when the frame ends. A frame longer than
    ``max_frame_chars`` raises :class:`FrameTooLarge` as soon as it is that long.
    """

    def __init__(self, max_frame_chars: int = DEFAULT_FRAME_BYTES) -> None:
        self.max_frame_chars = max_frame_chars
        self._parts: list[str] = []  # the open frame, in pieces
        self._size = 0
        self._cr = False  # the last piece ended in "\r": a "\n" starting the next one belongs to it

    def feed(self, text: str) -> Iterator[Frame]:
        if self._cr and text.startswith("\n"):
            text = text[1:]
        self._cr = text.endswith("\r")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text:
            return
        start = 0
        if self._parts and self._parts[-1].endswith("\n") and text.startswith("\n"):
            # A blank line across the seam: the open frame ends here.
            yield from self._end_frame(self._take_parts()[:-1])
            start = 1
        while (at := text.find("\n\n", start)) >= 0:
            block = text[start:at]
            if self._parts:
                block = self._take_parts() + block
            yield from self._end_frame(block)
            start = at + 2
        if start < len(text):
            rest = text[start:]
            self._size += len(rest)
            if self._size > self.max_frame_chars:
                raise FrameTooLarge(self.max_frame_chars)
            self._parts.append(rest)

    def close(self) -> Iterator[Frame]:
        """Frames still buffered when the stream ends (a last frame without its blank line)."""
        block = self._take_parts()
        if block.strip():
            yield from self._end_frame(block)

    def _take_parts(self) -> str:
        block = "".join(self._parts)
        self._parts, self._size = [], 0
        return block

    def _end_frame(self, block: str) -> Iterator[Frame]:
        if len(block) > self.max_frame_chars:
            raise FrameTooLarge(self.max_frame_chars)
        frame = _parse_block(block)
        if frame is not None:
            yield frame


def _parse_block(block: str) -> Frame | None:
    event: str | None = None
    data: list[str] = []
    for line in block.split("\n"):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if event is None and not data:
        return None
    return Frame(event, "\n".join(data))
