"""What telemetry reads from event streams: the usage frame and error frames, by byte scans.

Token counts come from the upstream's own usage report. On a streaming chat or text completion
that report is a frame of its own, ``{"choices": [], "usage": {...}}``, sent right before
``data: [DONE]``, and only when the request says ``stream_options.include_usage``. When the
client did not ask for it, the proxy asks on its behalf and a :class:`UsageTap` removes that frame
again, so the client's bytes are exactly what it would have received without lmgate.

The per-chunk cost is what the relay can afford: one substring search while the answer streams
(for a ``finish_reason`` that is a string, not null), no decoding, no copy. The usage frame comes
after the answer finished; from then on the tap also looks for ``"usage": {`` and parses only the
frame that holds it. That frame must arrive whole to be removed whole, so from then on the tap
passes on whole frames only: a chunk that ends inside a frame keeps that partial frame
back until its end arrives. A client cannot act on half a frame anyway (an SSE event is
dispatched at its blank line). Before that point chunks pass exactly as they came, so the first
byte reaches the client (and the timeout layer) as early as without telemetry.

An engine that ignores ``include_usage`` (llama-cpp-python's server) sends no usage frame at all.
So while it searches, the tap also counts the streamed tokens: one regular-expression scan per
chunk for a non-empty string value of a field that carries generated text (``content``,
``reasoning_content``, ``reasoning``, ``text``, a tool call's ``name`` and ``arguments``). LM
Studio and llama.cpp send one token per frame, so that is the completion's token count (an
approximation, documented). A stream that finished without a usage frame then reports that
count, with the prompt estimated from its length, marked as counted by lmgate.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.proxy.sse import ERROR_EVENT_MARKER
from gateway.proxy.upstream_errors import classify_upstream_message
from gateway.proxy.usage import estimate_tokens
from gateway.request.routes import DONE_TERMINATED
from gateway.telemetry.record import RequestRecord, record_of
from middleware.types import Scope

_USAGE_KEY = b'"usage"'
_FINISH_KEY = b'"finish_reason"'
# Bytes of a chunk that ended mid-frame kept to find a key split across chunks: the key, and
# room for blanks, the colon and the value's first byte.
_FINISH_WINDOW = len(_FINISH_KEY) + 16
# A partial frame longer than this is passed on rather than held (a stream that is not SSE).
_HOLD_LIMIT = 64 * 1024
_BLANKS = b" \t\r\n"
# A non-empty string value of a field that carries generated text: one streamed token. A match
# whose opening quote is escaped is the same words inside generated text (checked by hand: a
# look-behind makes the scan four times slower).
_TEXT_VALUE = re.compile(rb'"(?:content|reasoning_content|reasoning|text|arguments|name)"\s*:\s*"[^"]')
_BACKSLASH = 0x5C
# Bytes kept from the previous chunk so that a key split across chunks is still seen.
_COUNT_WINDOW = 48


def usage_tap(scope: Scope, path: str) -> UsageTap | None:
    """A tap for this request's stream, when a telemetry layer is in front and the route ends
    its streams with ``[DONE]``; None otherwise (the proxy then relays untouched)."""
    record = record_of(scope)
    if record is None or path not in DONE_TERMINATED:
        return None
    return UsageTap(record, strip=record.inject_usage)


def client_asked_usage(document: dict[str, Any]) -> bool:
    options = document.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class UsageTap:
    """Per upstream attempt: finds the usage frame (removing it when ``strip``) and, at the end, an
    error frame the upstream sent in place of ``[DONE]``; both land on the request's record."""

    __slots__ = ("record", "strip", "tokens", "_held", "_searching", "_finished", "_tail", "_last", "_count_tail")

    def __init__(self, record: RequestRecord, *, strip: bool) -> None:
        self.record = record
        self.strip = strip
        #: Tokens streamed so far, counted from the frames (what is reported if no usage comes).
        self.tokens = 0
        self._held = b""
        self._searching = True
        self._finished = False
        self._tail = b""
        self._last = b""
        self._count_tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on for ``chunk`` (possibly fewer, possibly with held ones first)."""
        if self._searching:
            self._count(chunk)
        if self._held:
            chunk = self._held + chunk
            self._held = b""
        if self._searching:
            if not self._finished:
                self._finished = self._saw_finish(chunk)
            if self._finished:
                end = _whole_frames_end(chunk)
                if end < len(chunk) and len(chunk) - end <= _HOLD_LIMIT:
                    chunk, self._held = chunk[:end], chunk[end:]
                if _USAGE_KEY in chunk:
                    chunk = self._take_usage(chunk)
        if chunk:
            self._last = chunk
        return chunk

    def close(self) -> bytes:
        """At the end of the stream: what is still held, the record of an upstream error frame,
        and, for an answer that finished without a usage frame, the tokens counted."""
        rest, self._held = self._held, b""
        tail = self._last + rest
        at = tail.rfind(ERROR_EVENT_MARKER)
        if at >= 0:
            code, message = error_frame_details(tail, at)
            self.record.note_error(code, message)
        elif self._searching and self._finished:
            prompt = estimate_tokens(self.record.prompt_chars)
            usage = {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}
            self.record.note_usage(usage, counted={"input": "estimated", "output": "counted"})
        return rest

    def _count(self, chunk: bytes) -> None:
        """Count the tokens in ``chunk``, a key split from the previous chunk included."""
        tail = self._count_tail
        window = tail + chunk if tail else chunk
        seen = len(tail)  # matches ending within it were counted with the last chunk
        for match in _TEXT_VALUE.finditer(window):
            start = match.start()
            if match.end() > seen and (start == 0 or window[start - 1] != _BACKSLASH):
                self.tokens += 1
        # A chunk that ends at a frame boundary cannot have split a key (the usual case: no copy).
        self._count_tail = b"" if chunk.endswith((b"\n\n", b"\r\n\r\n")) else window[-_COUNT_WINDOW:]

    def _saw_finish(self, chunk: bytes) -> bool:
        """Whether the answer has finished, counting a ``finish_reason`` split across chunks."""
        window = self._tail + chunk if self._tail else chunk
        if _finish_reason_given(window):
            self._tail = b""
            return True
        at_boundary = chunk.endswith(b"\n\n") or chunk.endswith(b"\r\n\r\n")
        self._tail = b"" if at_boundary else window[-_FINISH_WINDOW:]
        return False

    def _take_usage(self, chunk: bytes) -> bytes:
        search_from = 0
        while (at := chunk.find(_USAGE_KEY, search_from)) >= 0:
            search_from = at + len(_USAGE_KEY)
            if not _value_follows(chunk, search_from, opening=0x7B):  # "{"
                continue  # "usage": null on an ordinary chunk, or the word in generated text
            begin, end = _frame_bounds(chunk, at)
            document = _frame_json(chunk[begin:end])
            if document is not None and document.get("choices") == [] and isinstance(document.get("usage"), dict):
                self.record.note_usage(document["usage"], document)
                self._searching = False
                return chunk[:begin] + chunk[end:] if self.strip else chunk
            search_from = end
        return chunk


def error_frame_details(data: bytes, at: int) -> tuple[str, str]:
    """(code, message) of the ``event: error`` frame starting at ``data[at:]``.

    Both lmgate's frames (``{"error": {"message", "type", "code"}}``) and LM Studio's
    (``{"error": "text"}`` or ``{"error": {"message"}, "message"}``) are understood; a frame
    without a code is classified by its message, as the proxy does for error bodies.
    """
    _, end = _frame_bounds(data, at)
    document = _frame_json(data[at:end]) or {}
    error = document.get("error")
    message = ""
    code: object = None
    if isinstance(error, dict):
        message, code = str(error.get("message") or document.get("message") or ""), error.get("code")
    elif isinstance(error, str):
        message = error
    if not isinstance(code, str) or not code:
        code = classify_upstream_message(message, 500)[0]
    return code, message or "The upstream reported an error inside the stream."


def _whole_frames_end(chunk: bytes) -> int:
    """The index just past the last frame boundary (a blank line) in ``chunk``."""
    if chunk.endswith(b"\n\n") or chunk.endswith(b"\r\n\r\n"):
        return len(chunk)
    lf = chunk.rfind(b"\n\n")
    crlf = chunk.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _frame_bounds(chunk: bytes, at: int) -> tuple[int, int]:
    """(begin, end) of the frame around index ``at``; ``end`` includes its blank line."""
    lf = chunk.rfind(b"\n\n", 0, at)
    crlf = chunk.rfind(b"\n\r\n", 0, at)
    begin = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
    lf = chunk.find(b"\n\n", at)
    crlf = chunk.find(b"\n\r\n", at)
    ends = [i + 2 for i in (lf,) if i >= 0] + [i + 3 for i in (crlf,) if i >= 0]
    return begin, min(ends) if ends else len(chunk)


def _finish_reason_given(chunk: bytes) -> bool:
    """Whether a ``"finish_reason": "..."`` (a string, not null) is in ``chunk``."""
    at = chunk.find(_FINISH_KEY)
    while at >= 0:
        if _value_follows(chunk, at + len(_FINISH_KEY), opening=0x22):  # '"'
            return True
        at = chunk.find(_FINISH_KEY, at + len(_FINISH_KEY))
    return False


def _value_follows(chunk: bytes, index: int, *, opening: int) -> bool:
    """Whether ``:`` and a value starting with byte ``opening`` follow ``index`` (blanks allowed)."""
    size = len(chunk)
    while index < size and chunk[index] in _BLANKS:
        index += 1
    if index >= size or chunk[index] != 0x3A:  # ":"
        return False
    index += 1
    while index < size and chunk[index] in _BLANKS:
        index += 1
    return index < size and chunk[index] == opening


def _frame_json(frame: bytes) -> dict[str, Any] | None:
    """The JSON object in a frame's ``data:`` lines, or None."""
    lines = [line[5:] for line in frame.splitlines() if line.startswith(b"data:")]
    data = [line[1:] if line.startswith(b" ") else line for line in lines]
    try:
        document = json.loads(b"\n".join(data))
    except (ValueError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None
