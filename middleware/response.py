"""What a response has sent so far, as seen from one layer's ``send`` wrapper."""

from __future__ import annotations

from collections.abc import Iterable

from middleware.types import Message


class ResponseState:
    """Tracks one response: started, its status, whether it is an event stream, whether it ended.

    Each layer that must know "may I still change the status?" keeps its own instance in a local
    variable and calls ``observe`` from its ``send`` wrapper; nothing per request lives on the
    middleware object.
    """

    __slots__ = ("started", "status", "event_stream", "finished", "body_started", "at_frame_boundary")

    def __init__(self) -> None:
        self.started = False
        self.status = 0
        self.event_stream = False
        self.body_started = False
        self.finished = False
        # True while the bytes sent so far end on an SSE frame boundary (a blank line), so a frame
        # of our own (error, heartbeat) can be added without merging into a half-sent one.
        self.at_frame_boundary = True

    def observe(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            body = message.get("body")
            if body:
                self.body_started = True
                self.at_frame_boundary = body.endswith(b"\n\n") or body.endswith(b"\r\n\r\n")
            if not message.get("more_body", False):
                self.finished = True
        elif kind == "http.response.start":
            self.started = True
            self.status = message["status"]
            self.event_stream = is_event_stream(message.get("headers", ()))


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case bytes) in an ASGI header list."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    content_type = header_value(headers, b"content-type")
    return content_type is not None and content_type.lower().startswith(b"text/event-stream")
