"""Server-sent events: the little lmgate needs to know about frames.

The relay never decodes frames on the hot path: it scans bytes for the few markers it needs
(`[DONE]`, `event: error`). Full parsing (:func:`iter_frames`) is only for the non-streaming
assembly path, where the whole stream is consumed by lmgate anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

DONE_MARKER = b"data: [DONE]"
ERROR_EVENT_MARKER = b"event: error"
# Longest marker minus one: what must be kept from the previous chunk so a split marker is seen.
_TAIL = max(len(DONE_MARKER), len(ERROR_EVENT_MARKER)) - 1


class StreamMarkers:
    """Watches relayed chunks for the end-of-stream and error markers, across chunk splits."""

    __slots__ = ("done", "error", "_tail")

    def __init__(self) -> None:
        self.done = False
        self.error = False
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        window = self._tail + chunk
        if not self.done and DONE_MARKER in window:
            self.done = True
        if not self.error and ERROR_EVENT_MARKER in window:
            self.error = True
        self._tail = window[-_TAIL:]


@dataclass(frozen=True)
class Frame:
    event: str | None
    data: str


class FrameParser:
    """Incremental SSE parser (WHATWG rules, simplified: no ids or retry fields needed)."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> Iterator[Frame]:
        self._buffer += text.replace("\r\n", "\n").replace("\r", "\n")
        while "\n\n" in self._buffer:
            block, self._buffer = self._buffer.split("\n\n", 1)
            frame = _parse_block(block)
            if frame is not None:
                yield frame

    def close(self) -> Iterator[Frame]:
        """Frames still buffered when the stream ends (a last frame without its blank line)."""
        block, self._buffer = self._buffer, ""
        frame = _parse_block(block) if block.strip() else None
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
