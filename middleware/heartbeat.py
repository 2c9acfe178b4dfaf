"""Heartbeats: keep a silent event stream open, and open it early when the app is slow to answer.

Proxies and clients give up on a connection that sends nothing: NGINX after ``proxy_read_timeout``
(60 s by default), browsers' and Node's fetch after their idle timeouts. An LLM stream can be
silent for minutes (a model load, a long prompt, a queue) while nothing is wrong. This layer fills
such silences with SSE comment lines (``: ...``), which every SSE parser skips, so the answer a
client parses is unchanged.

For a request that expects an event stream (``"stream": true`` in its JSON body, or ``Accept:
text/event-stream``):

* If the inner app has sent nothing for ``interval_s``, the layer starts the response itself:
  ``200``, ``text/event-stream``, ``Cache-Control: no-cache``, ``X-Accel-Buffering: no``, the
  request's ``X-Request-ID`` and whatever ``start_headers(scope)`` returns (what inner layers
  already know: lmgate's cold-start layer says ``X-Lmgate-Model-State`` there); then a
  heartbeat frame every ``interval_s`` of silence.
* From then on the inner app's ``http.response.start`` is swallowed. Its headers that matter to a
  client (``carry_headers`` prefixes, ``X-Lmgate-*`` by default) are sent as one SSE comment
  when that start arrives, the first moment they are known. An inner error response (status 400 or
  more, or any answer that is not an event stream) becomes an ``event: error`` frame carrying the
  inner JSON error body, which ends the stream, so the client still sees the failure.
* If the inner app starts first (a warm model), the layer adds nothing until a silence of
  ``interval_s``: a stream without such a pause reaches the client byte for byte as the app sent it.

Once any event-stream response has started, a heartbeat goes out after each ``interval_s`` of
silence, and only at a frame boundary (never inside a frame the app has half sent). A heartbeat
never interleaves with an app chunk: it is skipped while an app send is under way, and an app send
waits for a heartbeat being sent.

Starting the response early commits the status to 200: a failure after that can only be an SSE
error frame. That is why the layer sits *above* retry and the timeout: retries inside it still see
only the upstream's response (they stay possible while only heartbeats went out), and heartbeat
bytes never count as a first token or reset an idle deadline. Exceptions from the inner app
propagate unchanged; an ``ErrorMiddleware`` outside renders them as an SSE error frame, since it
sees the started stream.

What a heartbeat says is up to ``describe(scope, elapsed_s)``, which returns the frame bytes (one
or more complete frames); the default is ``: lmgate waiting elapsed_s=12``. lmgate's cold-start
layer supplies one that reports model loads.

The layer wraps every request, and almost none ever needs a heartbeat, so it waits for silences
with a timer armed with the running asyncio loop (uvloop included; also under anyio on asyncio,
not trio) and starts a task only to send a heartbeat: a quiet request costs no task.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Collection, Iterable

import anyio

from middleware.body import DEFAULT_LIMIT_BYTES, read_body, replaying_receive, request_json
from middleware.errors import StreamCut, UpstreamProtocolError
from middleware.request_id import request_id
from middleware.response import ResponseState, header_value, is_event_stream
from middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Describe", "HeartbeatMiddleware", "StartHeaders", "comment_frame", "event_frame", "expects_event_stream"]

#: ``describe(scope, elapsed_s)`` -> the heartbeat frame(s), each ending in a blank line.
Describe = Callable[[Scope, float], bytes]
#: ``start_headers(scope)`` -> further headers for a response the layer starts early.
StartHeaders = Callable[[Scope], Iterable[tuple[bytes, bytes]]]

PRESTART_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
DEFAULT_CARRY_HEADERS: tuple[bytes, ...] = (b"x-lmgate-",)
# The clock of silences, read on every chunk. Timers are armed with delays measured on it, so it need
# not be the loop's own clock (uvloop's is a cached millisecond one).
_now = time.monotonic
# An inner error body is a small JSON document; past this it is cut before being framed.
_HELD_LIMIT_BYTES = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def comment_frame(text: str) -> bytes:
    """``text`` as one SSE comment frame (line breaks become spaces: a comment is one line)."""
    line = " ".join(text.splitlines())
    return f": {line}\n\n".encode()


def event_frame(event: str, data: object) -> bytes:
    """A named SSE event whose data is ``data`` as compact JSON."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


def default_describe(scope: Scope, elapsed_s: float) -> bytes:
    return comment_frame(f"lmgate waiting elapsed_s={elapsed_s:.0f}")


async def expects_event_stream(scope: Scope, receive: Receive, *, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> bool:
    """Whether the client asked for an event stream: ``Accept: text/event-stream`` or ``"stream": true``.

    Reads (and caches, see ``middleware.body``) the body of POST/PUT/PATCH requests.
    """
    accept = header_value(scope.get("headers", ()), b"accept")
    if accept is not None and b"text/event-stream" in accept.lower():
        return True
    if scope.get("method") not in _BODY_METHODS:
        return False
    await read_body(scope, receive, limit_bytes=limit_bytes)
    document = request_json(scope)
    return document is not None and document.get("stream") is True


class HeartbeatMiddleware:
    """Send SSE heartbeats during silences and start slow event streams early; see the module doc.

    ``interval_s``: silence before a heartbeat (and before an early start). ``describe``: the
    heartbeat frame(s) for a request. ``carry_headers``: lower-case name prefixes of inner headers
    worth a comment when the inner start had to be swallowed. ``start_headers``: headers (lower-case
    names) an early start carries besides the layer's own, read from the scope at that moment.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        interval_s: float = 10.0,
        describe: Describe | None = None,
        carry_headers: Collection[bytes] = DEFAULT_CARRY_HEADERS,
        start_headers: StartHeaders | None = None,
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
    ) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not interval_s > 0:
            raise ValueError(f"interval_s must be a number of seconds above 0, got {interval_s!r}")
        if math.isinf(interval_s):
            raise ValueError("interval_s must be finite")
        self.app = app
        self.interval_s = float(interval_s)
        self.describe = describe or default_describe
        self.carry_headers = tuple(carry_headers)
        self.start_headers = start_headers
        self.body_limit_bytes = body_limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wants_stream = await expects_event_stream(scope, receive, limit_bytes=self.body_limit_bytes)
        relay = _Relay(
            send, scope, carry_headers=self.carry_headers, start_headers=self.start_headers, wants_stream=wants_stream
        )
        ticker = _Ticker(relay, scope, self.interval_s, self.describe)
        try:
            await self.app(scope, replaying_receive(scope, receive), relay.inner_send)
        except asyncio.CancelledError:
            await ticker.stop(cancelled=True)
            ticker.raise_failure()  # the cancellation was the ticker's own, for a heartbeat that failed
            raise
        except BaseException:
            await ticker.stop(cancelled=False)
            raise
        await ticker.stop(cancelled=False)
        ticker.raise_failure()
        if relay.prestarted and not relay.client.finished:
            raise StreamCut("The response ended before it was complete.")


class _Ticker:
    """Heartbeats for one request: a timer armed with the event loop, and a task only to send a beat.

    The layer wraps every request and almost none ever needs a heartbeat, so the quiet case costs one
    ``call_later`` (about a microsecond; a task group with a background task costs ~50). The timer
    fires ``interval_s`` after the last byte as it stood when the timer was armed; if bytes flowed
    since, it is re-armed for the new deadline then, rather than on every chunk. A heartbeat that may
    go is sent by one task, which re-arms the timer when done.

    As a background task in a task group would be: a heartbeat under way is waited for before the
    layer returns (and cancelled with the request), and a heartbeat that fails cancels the request's
    task and its exception propagates from the layer as itself.
    """

    __slots__ = (
        "relay", "scope", "interval_s", "describe", "arrived_at", "loop", "host", "handle", "task", "failure", "cancelled_host",
    )

    def __init__(self, relay: _Relay, scope: Scope, interval_s: float, describe: Describe) -> None:
        self.relay = relay
        self.scope = scope
        self.interval_s = interval_s
        self.describe = describe
        self.arrived_at = relay.last_byte_at
        self.loop = asyncio.get_running_loop()
        self.host = asyncio.current_task()
        self.task: asyncio.Task[None] | None = None
        self.failure: Exception | None = None  # the heartbeat's exception, raised by the layer
        self.cancelled_host = False
        self.handle: asyncio.TimerHandle | None = None
        self._arm(interval_s)

    def _arm(self, delay_s: float) -> None:
        # A delay, not a loop time: silences are measured on ``_now``, not on ``loop.time()``. A timer
        # that fires a little early (uvloop rounds to milliseconds) just re-arms for the rest.
        self.handle = self.loop.call_later(max(0.0, delay_s), self._tick)

    def _tick(self) -> None:
        self.handle = None
        relay = self.relay
        if relay.done:
            return
        now = _now()
        if now - relay.last_byte_at < self.interval_s:
            self._arm(relay.last_byte_at + self.interval_s - now)  # the app sent something meanwhile
        elif relay.may_beat():
            self.task = self.loop.create_task(self._beat(now))
        else:
            self._arm(self.interval_s)

    async def _beat(self, now: float) -> None:
        relay = self.relay
        try:
            if relay.may_beat():  # again: the app may have begun a send since the timer fired
                await relay.heartbeat(self.describe(self.scope, now - self.arrived_at))
        except Exception as failure:
            self.failure = failure
            if not relay.closed and self.host is not None:
                self.host.cancel()  # the request goes no further, as when a task group's child fails
                self.cancelled_host = True
            return
        if not relay.done:
            self._arm(now + self.interval_s - _now())

    async def stop(self, *, cancelled: bool) -> None:
        """No heartbeat from now on; wait for one under way (cancelled if the request was)."""
        self.relay.closed = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.cancelled_host and self.host is not None:
            self.host.uncancel()  # the app has ended: the cancellation a failed heartbeat caused is spent
        task = self.task
        if task is None or task.done():
            return
        if cancelled:
            await self._cancel(task)
            return
        try:
            # A heartbeat being sent finishes before the layer returns, so an error frame rendered
            # further out never interleaves with it.
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            await self._cancel(task)
            raise

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        """Cancel the heartbeat with the request and wait for it, as a task group does its children."""
        task.cancel()
        with anyio.CancelScope(shield=True):  # anyio's cancellation would interrupt the wait again
            await asyncio.wait((task,))

    def raise_failure(self) -> None:
        """Raise the exception a heartbeat failed with, if one did."""
        if self.failure is not None:
            raise self.failure


class _Relay:
    """One response as the client sees it: the app's messages and the layer's own, never interleaved.

    The app's sends are the hot path (one per token), so there is no lock: the event loop runs one
    task at a time, a heartbeat is skipped while an app send is under way (bytes are flowing), and
    an app send waits only while a heartbeat is being sent.
    """

    __slots__ = (
        "send", "scope", "carry_headers", "start_headers", "wants_stream", "client", "prestarted", "last_byte_at",
        "converting", "inner_status", "inner_headers", "held", "app_sending", "beating", "closed",
    )

    def __init__(
        self,
        send: Send,
        scope: Scope,
        *,
        carry_headers: tuple[bytes, ...],
        start_headers: StartHeaders | None,
        wants_stream: bool,
    ) -> None:
        self.send = send
        self.scope = scope
        self.carry_headers = carry_headers
        self.start_headers = start_headers
        self.wants_stream = wants_stream
        self.client = ResponseState()  # what the client has been sent, by anyone
        self.prestarted = False
        self.last_byte_at = _now()
        self.converting = False  # the inner answer is an error being turned into an SSE frame
        self.inner_status = 0
        self.inner_headers: list[tuple[bytes, bytes]] = []
        self.held = bytearray()
        self.app_sending = False
        self.beating: anyio.Event | None = None  # set while a heartbeat is being sent
        self.closed = False  # the app returned: no more heartbeats

    @property
    def done(self) -> bool:
        """Nothing more will ever be sent by the layer: the response ended, or it is not a stream."""
        return self.closed or self.client.finished or (self.client.started and not self.client.event_stream)

    def may_beat(self) -> bool:
        if self.app_sending or self.beating is not None or self.closed:
            return False
        if not self.client.started:
            return self.wants_stream
        return self.client.event_stream and self.client.at_frame_boundary and not self.converting

    async def _send(self, message: Message) -> None:
        self.client.observe(message)
        await self.send(message)
        self.last_byte_at = _now()

    async def heartbeat(self, frame: bytes) -> None:
        """Send one heartbeat (starting the response first if needed); call only if ``may_beat()``."""
        beating = self.beating = anyio.Event()
        try:
            if not self.client.started:
                self.prestarted = True
                headers = [*PRESTART_HEADERS, (b"x-request-id", request_id(self.scope).encode("latin-1"))]
                if self.start_headers is not None:
                    headers.extend(self.start_headers(self.scope))
                await self._send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._send({"type": "http.response.body", "body": frame, "more_body": True})
        finally:
            self.beating = None
            beating.set()

    async def inner_send(self, message: Message) -> None:
        while self.beating is not None:
            await self.beating.wait()
        self.app_sending = True
        try:
            if not self.prestarted:
                await self._send(message)
            elif message["type"] == "http.response.start":
                await self._inner_start(message)
            elif message["type"] == "http.response.body":
                await self._inner_body(message)
        finally:
            self.app_sending = False

    async def _inner_start(self, message: Message) -> None:
        self.inner_status = int(message["status"])
        self.inner_headers = list(message.get("headers", ()))
        if self.inner_status >= 400 or not is_event_stream(self.inner_headers):
            self.converting = True
            return
        carried = [f"{k.decode('latin-1')}={v.decode('latin-1')}" for k, v in self.inner_headers if self._carried(k)]
        if carried:
            await self._send({"type": "http.response.body", "body": comment_frame("lmgate " + " ".join(carried)), "more_body": True})

    def _carried(self, name: bytes) -> bool:
        return bool(self.carry_headers) and name.lower().startswith(self.carry_headers)

    async def _inner_body(self, message: Message) -> None:
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if not self.converting:
            if body or not more:
                await self._send({"type": "http.response.body", "body": body, "more_body": more})
            return
        room = _HELD_LIMIT_BYTES - len(self.held)
        self.held += body[: max(0, room)]
        if not more:
            await self._send({"type": "http.response.body", "body": self._error_frame(), "more_body": False})

    def _error_frame(self) -> bytes:
        """The inner answer as an ``event: error`` frame: its own JSON error if it has one."""
        try:
            document = json.loads(bytes(self.held))
        except (ValueError, UnicodeDecodeError):
            document = None
        if not (isinstance(document, dict) and "error" in document):
            content_type = (header_value(self.inner_headers, b"content-type") or b"no content type").decode("latin-1")
            document = UpstreamProtocolError(
                f"The answer was HTTP {self.inner_status} ({content_type}), not an event stream."
            ).to_dict()
        payload = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        return f"event: error\ndata: {payload}\n\n".encode()
