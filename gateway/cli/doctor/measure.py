"""One streamed generation, measured the way a client lives it: time to first token, latency,
tokens per second, the longest silence, and how it failed if it did.

Failures get the telemetry layer's categories (``gateway.telemetry.events``), from lmgate's
``X-Lmgate-Error`` code where there is one, else from LM Studio's message wording
(``gateway.proxy.upstream_errors.classify_upstream_message``), else from the status. A connection that drops
before the answer is complete is a *disconnect* (the guide's word): a reset before the headers, or
a stream that ends without ``data: [DONE]``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

from gateway.cli.doctor.report import Attempt
from gateway.proxy.sse import FrameParser
from gateway.proxy.upstream_errors import classify_upstream_message, describe
from gateway.telemetry.events import categorise

CHAT_PATH = "/v1/chat/completions"
#: Short, so prompt length is never the cause; "tiny" is the troubleshooting guide's word.
PROMPT = "Reply with one short sentence about the sea."
TINY_PROMPT = "Say ok."
_ERROR_BODY_LIMIT = 64 * 1024
_CARRIED_LOAD_MS = re.compile(r"\bx-lmgate-load-ms=(\d+)")


def chat_body(model: str, *, prompt: str = PROMPT, max_tokens: int = 32) -> dict[str, Any]:
    """A streamed chat request. Temperature 0.7: like real traffic, and never a response-cache hit."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class _Stream:
    """The state of one streamed answer while it is read."""

    def __init__(self, started: float) -> None:
        self.parser = FrameParser()
        self.last_byte = started
        self.longest_silence = 0.0
        self.partial_line = ""
        self.heartbeats = 0
        self.first_token: float | None = None
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.done = False
        self.error: tuple[str, str] | None = None  # (code, message) from an error frame
        self.load_ms: int | None = None

    def tick(self) -> float:
        now = time.monotonic()
        self.longest_silence = max(self.longest_silence, now - self.last_byte)
        self.last_byte = now
        return now

    def feed(self, text: str) -> None:
        now = self.tick()
        lines = (self.partial_line + text).split("\n")
        self.partial_line = lines.pop()
        for line in lines:
            if line.startswith(":"):
                self.heartbeats += 1
                carried = _CARRIED_LOAD_MS.search(line)  # lmgate's headers, when heartbeats started the stream
                self.load_ms = int(carried.group(1)) if carried else self.load_ms
        for frame in self.parser.feed(text):
            self._frame(frame.event, frame.data, now)

    def _frame(self, event: str | None, data: str, now: float) -> None:
        if data == "[DONE]":
            self.done = True
            return
        try:
            document = json.loads(data)
        except ValueError:
            return
        if not isinstance(document, dict):
            return
        if event == "error" or "error" in document:
            self.error = _error_of(document, status=500) if self.error is None else self.error
            return
        usage = document.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        for choice in document.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")):
                self.chunks += 1
                self.first_token = self.first_token or now


def _error_of(document: Any, *, status: int, header_code: str | None = None) -> tuple[str, str]:
    """(code, message) of an OpenAI-shaped or LM Studio-shaped error document."""
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    message = message if isinstance(message, str) and message else f"HTTP {status}"
    code = header_code or (error.get("code") if isinstance(error, dict) else None)
    if not isinstance(code, str) or not code:
        code, _ = classify_upstream_message(message, status)
    return code, message


async def measure_chat(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], *, timeout_s: float
) -> Attempt:
    """Send ``body`` as a streamed chat completion and measure it; never raises for HTTP failures."""
    started = time.monotonic()
    stream = _Stream(started)
    status: int | None = None
    load_s: float | None = None

    def failed(code: str, message: str, *, disconnected: bool = False) -> Attempt:
        return Attempt(
            ok=False, latency_s=time.monotonic() - started, code=code,
            category=categorise(code, status if status is not None and status >= 400 else 502),
            message=message[:300], status=status, disconnected=disconnected, longest_silence_s=stream.longest_silence,
            heartbeats=stream.heartbeats, load_s=load_s,
        )

    with anyio.move_on_after(timeout_s) as deadline:
        try:
            async with client.stream("POST", url + CHAT_PATH, json=body, headers={"cache-control": "no-store"}) as response:
                stream.tick()
                status = response.status_code
                waited = response.headers.get("x-lmgate-load-ms")
                load_s = int(waited) / 1000 if waited and waited.isdigit() else None
                if status >= 400:
                    raw = b""
                    async for chunk in response.aiter_bytes():  # an error body is small; cap it anyway
                        raw += chunk
                        if len(raw) > _ERROR_BODY_LIMIT:
                            break
                    document = _json_or_none(raw)
                    code, message = _error_of(document, status=status, header_code=response.headers.get("x-lmgate-error"))
                    return failed(code, message)
                async for text in response.aiter_text():
                    stream.feed(text)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
            return failed("upstream_unavailable", f"could not connect: {describe(exc)}")
        except httpx.TimeoutException as exc:  # the client gives up: LM Studio logs "Client disconnected"
            return failed("timeout", f"the server went silent: {describe(exc)}", disconnected=True)
        except httpx.HTTPError as exc:
            code = "stream_cut" if status is not None else "upstream_unavailable"
            return failed(code, f"the connection dropped: {describe(exc)}", disconnected=True)
    if deadline.cancelled_caught:
        return failed("timeout", f"no complete answer within {timeout_s:g} s", disconnected=True)
    ended = stream.tick()
    load_s = stream.load_ms / 1000 if stream.load_ms is not None else load_s
    if stream.error is not None:
        return failed(*stream.error)
    if not stream.done:
        return failed("stream_cut", "the stream ended without data: [DONE]", disconnected=True)
    tokens = stream.usage_tokens if stream.usage_tokens is not None else stream.chunks
    rate = None
    if stream.first_token is not None and tokens > 1 and ended > stream.first_token:
        rate = (tokens - 1) / (ended - stream.first_token)
    return Attempt(
        ok=True, latency_s=ended - started, status=status,
        ttft_s=stream.first_token - started if stream.first_token is not None else None,
        tokens=tokens, tokens_per_s=rate, longest_silence_s=stream.longest_silence, heartbeats=stream.heartbeats,
        load_s=load_s,
    )


async def run_batch(
    measure: Callable[[], Awaitable[Attempt]], *, count: int, concurrency: int,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[Attempt]:
    """``count`` measurements, at most ``concurrency`` at once; ``progress(done, total, failed)`` after each."""
    attempts: list[Attempt] = []
    limiter = anyio.CapacityLimiter(concurrency)

    async def one() -> None:
        async with limiter:
            attempts.append(await measure())
        if progress is not None:
            progress(len(attempts), count, sum(not a.ok for a in attempts))

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return attempts


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
