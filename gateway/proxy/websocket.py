"""LM Studio's SDK WebSockets, relayed to the upstream: the terminal app of ``websocket`` scopes.

LM Studio's SDKs (``lmstudio``, ``@lmstudio/sdk``) and ``lms`` probe ``GET /lmstudio-greeting``,
then open one WebSocket per namespace (:data:`SDK_PATHS`) on the same port and speak JSON over
it. A socket's life here:

1. Upgrade (before accepting): refused with an HTTP answer in the OpenAI error shape (the
   ``websocket.http.response`` extension; a plain 403 on a server without it) when the path is no
   SDK namespace (404), lmgate is draining (503 ``draining``), ``websockets.max_open`` sockets are
   open (503 ``overloaded``), or an ``Authorization`` header carries a key that is not valid (401).
2. Accept, then read the first message, the SDK's auth packet (``gateway.proxy.sdk_auth``), within
   ``websockets.auth_timeout_s``. With client keys configured and none in a header, the packet must
   carry one (an lmgate client key in LM Studio's ``sk-lm-<id>:<passkey>`` format): otherwise it is
   answered ``{"success": false, "error": ...}``, as LM Studio does, and closed with 1008. All of
   this happens before any upstream connection is opened.
3. Connect to the upstream: the first reachable one, with the fewest sockets open (there is no
   model at upgrade time; the SDK's model handles then stay on that upstream). An upstream that
   cannot be reached closes the client with 1011: the socket was already accepted for step 2, and
   the SDK reports the close as "LM Studio is not reachable". The upstream gets the auth packet
   rewritten so the client's key never reaches it (``upstream.api_key`` in LM Studio's format when
   set).
4. Relay: each message goes on as it arrives, text as text and binary as binary, unchanged;
   ``await send`` is the backpressure, nothing is queued in between. Pings are answered on each
   side by the server and the client library.
5. The end: the first side to close decides. A client that leaves closes the upstream socket at
   once with the client's code (LM Studio cancels what it was predicting for it); an upstream that
   leaves closes the client with the upstream's code and reason. Codes that may not be sent on the
   wire (1005, 1006, 1015) become 1000, or 1011 for an upstream lost without a close frame, 1001
   for a client lost. A message over ``websockets.max_message_bytes`` closes its sender with 1009.
   On shutdown the socket counts as in flight (``DrainState.tracked``): at the drain deadline both
   sides are closed with 1001.

The client library is ``websockets`` (its asyncio API): it enforces a message-size bound while
reading (``max_size``), answers pings, closes with a chosen code and reason, and reports the
peer's close frame (``ConnectionClosed.rcvd``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import anyio
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from gateway.proxy.sdk_auth import AuthPacket, parse_auth_packet, refusal, upstream_packet
from gateway.request.routes import route_path
from gateway.telemetry.metrics import WebSocketMetrics
from middleware.auth import presented_key
from middleware.drain import DrainState
from middleware.errors import Draining, LmgateError, NotFound, Overloaded, Unauthorized, error_body
from middleware.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:  # websockets is imported by the first SDK socket: a gateway nobody opens one to never loads it
    from websockets.asyncio.client import ClientConnection
    from websockets.exceptions import ConnectionClosed

__all__ = ["SDK_PATHS", "SdkSockets", "SocketLimits", "SocketTarget", "WebSocketRelay"]

logger = logging.getLogger("lmgate.websocket")

#: The namespaces LM Studio's SDKs open sockets on (``ws://host/<namespace>``).
SDK_PATHS = frozenset(
    {"/llm", "/embedding", "/system", "/diagnostics", "/files", "/repository", "/plugins", "/runtime"}
)
GREETING = "/lmstudio-greeting"

# Close codes (RFC 6455 §7.4.1).
NORMAL, GOING_AWAY, POLICY, TOO_BIG, INTERNAL = 1000, 1001, 1008, 1009, 1011
_NOT_ON_THE_WIRE = frozenset({1004, 1005, 1006, 1015})


@dataclass(frozen=True)
class SocketTarget:
    """One upstream as the relay sees it."""

    name: str
    url: str  # http(s)://host:port of the upstream
    api_key: str | None = None
    forward_client_auth: bool = False

    def socket_url(self, path: str) -> str:
        base = self.url.rstrip("/")
        return ("wss://" + base[len("https://") :] if base.startswith("https://") else "ws://" + base.split("://", 1)[-1]) + path


@dataclass(frozen=True)
class SocketLimits:
    max_open: int = 80
    max_message_bytes: int = 16 * 1024 * 1024
    auth_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    close_timeout_s: float = 2.0  # the closing handshake with either side, once decided
    ping_interval_s: float | None = 20.0  # lmgate's pings to the upstream (a dead one is noticed)


class KeyCheck(Protocol):
    """What the relay needs of the auth layer (``AuthMiddleware``): whether keys are on, and a key's identity."""

    @property
    def enabled(self) -> bool: ...

    def identify(self, key: str) -> tuple[str | None, bool]: ...


@dataclass
class _Socket:
    """One socket's facts, for its telemetry (kept in the relay's locals, never on the relay)."""

    namespace: str
    opened_at: float
    identity: str | None = None
    upstream: str | None = None
    messages: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    bytes: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    closed_by: str | None = None  # client, upstream or lmgate
    code: int | None = None
    reason: str = ""
    # What is left to send each side at the end (None: that side is closed or never opened).
    client_close: tuple[int, str] | None = None
    upstream_close: tuple[int, str] | None = None
    connection: ClientConnection | None = None  # the upstream socket once connected
    relayed: bool = False  # the auth packet went upstream: the socket is open end to end

    def decide(self, by: str, code: int, reason: str) -> None:
        if self.closed_by is None:
            self.closed_by, self.code, self.reason = by, code, reason


def _size(data: str | bytes) -> int:
    # str.isascii() is O(1) in CPython: no copy for the usual ASCII JSON.
    return len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode("utf-8"))


def _on_the_wire(code: int, *, lost: int) -> int:
    """A close code that may be sent: 1005 (no code) becomes 1000, a lost connection ``lost``."""
    if code == 1005:
        return NORMAL
    if code in _NOT_ON_THE_WIRE or not (1000 <= code <= 4999):
        return lost
    return code


class WebSocketRelay:
    """The terminal app of the SDK's sockets; see the module docstring.

    Options:
        targets: the upstreams, in configuration order.
        keys: the client-key check (None or disabled: no keys).
        drain: the gateway's drain state.
        limits: :class:`SocketLimits`.
        reachable: ``name -> bool``: the router's view of an upstream (default: always).
        metrics, tracer: telemetry (None: off).
    """

    def __init__(
        self,
        *,
        targets: Sequence[SocketTarget],
        keys: KeyCheck | None,
        drain: DrainState,
        limits: SocketLimits,
        reachable: Callable[[str], bool] | None = None,
        metrics: WebSocketMetrics | None = None,
        tracer: Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not targets:
            raise ValueError("the relay needs at least one upstream")
        self.targets = tuple(targets)
        self.keys = keys if keys is not None and keys.enabled else None
        self.drain = drain
        self.limits = limits
        self.reachable = reachable or (lambda name: True)
        self.metrics = metrics
        self.tracer = tracer
        self.clock = clock
        #: Sockets open (and upgrades past the checks), per upstream name ("" before one is chosen).
        self.open: dict[str, int] = {}

    @property
    def open_total(self) -> int:
        return sum(self.open.values())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            raise TypeError("WebSocketRelay serves websocket scopes only")
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        path = route_path(scope)
        socket = _Socket(namespace=path, opened_at=self.clock())
        refused = self._check_upgrade(scope, path, socket)
        if refused is not None:
            await _deny(scope, send, refused)
            return
        self.open[""] = self.open.get("", 0) + 1  # counted against the cap from here
        try:
            with self.drain.tracked() as cancel_scope:
                span = self._start_span(scope, socket)
                try:
                    with cancel_scope:
                        await self._serve(scope, receive, send, socket)
                except BaseException as exc:
                    if not isinstance(exc, anyio.get_cancelled_exc_class()):
                        logger.exception("websocket relay failed", extra={"event": "ws_error", "namespace": path})
                        socket.decide("lmgate", INTERNAL, "lmgate failed")
                    raise
                finally:
                    if cancel_scope.cancel_called:
                        socket.decide("lmgate", GOING_AWAY, "lmgate is shutting down")
                    with anyio.CancelScope(shield=True):
                        await self._close(send, socket)
                    self._finish(socket, span)
        finally:
            self._release(socket.upstream)

    # -- the upgrade ---------------------------------------------------------------------------

    def _check_upgrade(self, scope: Scope, path: str, socket: _Socket) -> LmgateError | None:
        if path not in SDK_PATHS:
            return self._refuse("not_found", NotFound(f"lmgate relays WebSockets on LM Studio's SDK paths only, not {path!r}."))
        if self.drain.draining:
            return self._refuse("draining", Draining())
        if self.open_total >= self.limits.max_open:
            return self._refuse(
                "max_open",
                Overloaded(f"lmgate has {self.limits.max_open} WebSockets open, its limit (websockets.max_open); try again later."),
            )
        key = presented_key(scope)
        if self.keys is not None and key is not None:
            socket.identity = self.keys.identify(key)[0]
            if socket.identity is None:
                return self._refuse("invalid_key", Unauthorized("The API key is not valid for this gateway."))
        return None

    def _refuse(self, reason: str, error: LmgateError) -> LmgateError:
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()
        return error

    # -- the session ---------------------------------------------------------------------------

    async def _serve(self, scope: Scope, receive: Receive, send: Send, socket: _Socket) -> None:
        await send({"type": "websocket.accept"})
        socket.client_close = (NORMAL, "")  # open: something must be sent at the end
        first = await self._first_message(receive, socket)
        if first is None:
            return
        packet = parse_auth_packet(first)
        if self.keys is not None and socket.identity is None and not await self._authenticate(packet, send, socket):
            return
        upstream = socket.connection = await self._connect(socket)
        if upstream is None:
            return
        socket.upstream_close = (NORMAL, "")
        await upstream.send(
            upstream_packet(packet, upstream_token=self._target(socket).api_key,
                            forward_client_auth=self._target(socket).forward_client_auth)
            if packet is not None
            else first
        )
        self._count(socket, "in", first)
        socket.relayed = True
        self._log_open(socket)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._client_to_upstream, receive, upstream, socket, tasks.cancel_scope)
            tasks.start_soon(self._upstream_to_client, upstream, send, socket, tasks.cancel_scope)

    async def _first_message(self, receive: Receive, socket: _Socket) -> str | bytes | None:
        with anyio.move_on_after(self.limits.auth_timeout_s):
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self._client_left(socket, message)
                return None
            data = _payload(message)
            if data is None:
                return None
            if _size(data) > self.limits.max_message_bytes:
                socket.decide("lmgate", TOO_BIG, "message larger than websockets.max_message_bytes")
                socket.client_close = (TOO_BIG, socket.reason)
                return None
            return data
        self._refuse("auth_timeout", LmgateError())
        socket.decide("lmgate", POLICY, "no auth packet in time")
        socket.client_close = (POLICY, socket.reason)
        return None

    async def _authenticate(self, packet: AuthPacket | None, send: Send, socket: _Socket) -> bool:
        assert self.keys is not None
        token = packet.token if packet is not None else None
        socket.identity = self.keys.identify(token)[0] if token is not None else None
        if socket.identity is not None:
            return True
        reason = "missing_key" if token is None else "invalid_key"
        self._refuse(reason, LmgateError())
        cause = (
            "No lmgate client key was sent."
            if token is None
            else "The API token is not a valid client key for this lmgate gateway."
        )
        suggestion = (
            "Set LMSTUDIO_API_TOKEN (or pass api_token) to an lmgate client key in LM Studio's token format, "
            "sk-lm-<8 letters or digits>:<20 letters or digits>."
        )
        await send({"type": "websocket.send", "text": refusal("Invalid API token", cause, suggestion)})
        socket.decide("lmgate", POLICY, "invalid_api_key")
        socket.client_close = (POLICY, socket.reason)
        return False

    async def _connect(self, socket: _Socket) -> ClientConnection | None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidURI

        errors: list[str] = []
        for target in self._choices():
            self._move(socket, target.name)
            headers = [("Authorization", f"Bearer {target.api_key}")] if target.api_key else []
            try:
                return await connect(
                    target.socket_url(socket.namespace),
                    additional_headers=headers,
                    max_size=self.limits.max_message_bytes,
                    open_timeout=self.limits.connect_timeout_s,
                    close_timeout=self.limits.close_timeout_s,
                    ping_interval=self.limits.ping_interval_s,
                    ping_timeout=self.limits.ping_interval_s,
                    compression=None,  # LM Studio is local: deflating costs more than it saves
                    user_agent_header=None,
                    proxy=None,  # like the HTTP client (trust_env=False): no proxy from the environment
                )
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                errors.append(f"{target.name}: {type(exc).__name__}: {exc}"[:200])
        socket.decide("lmgate", INTERNAL, "lmgate could not reach the upstream")
        socket.client_close = (INTERNAL, socket.reason)
        self._refuse("upstream_unreachable", LmgateError())
        logger.warning(
            "no upstream took the websocket",
            extra={"event": "ws_upstream_unreachable", "namespace": socket.namespace, "errors": errors},
        )
        return None

    def _choices(self) -> list[SocketTarget]:
        """Reachable upstreams first, then the fewest sockets open, then configuration order."""
        ranked = sorted(
            enumerate(self.targets),
            key=lambda item: (not self.reachable(item[1].name), self.open.get(item[1].name, 0), item[0]),
        )
        return [target for _, target in ranked]

    def _target(self, socket: _Socket) -> SocketTarget:
        return next(target for target in self.targets if target.name == socket.upstream)

    def _move(self, socket: _Socket, name: str) -> None:
        self._release(socket.upstream)
        socket.upstream = name
        self.open[name] = self.open.get(name, 0) + 1

    def _release(self, name: str | None) -> None:
        key = name if name is not None else ""
        self.open[key] -= 1
        if not self.open[key]:
            del self.open[key]

    # -- the relay -----------------------------------------------------------------------------

    async def _client_to_upstream(
        self, receive: Receive, upstream: ClientConnection, socket: _Socket, done: anyio.CancelScope
    ) -> None:
        from websockets.exceptions import ConnectionClosed

        limit = self.limits.max_message_bytes
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self._client_left(socket, message)
                break
            data = _payload(message)
            if data is None:
                continue
            if _size(data) > limit:
                socket.decide("lmgate", TOO_BIG, "message larger than websockets.max_message_bytes")
                socket.client_close = (TOO_BIG, socket.reason)
                socket.upstream_close = (GOING_AWAY, "the client's message was too big")
                break
            self._count(socket, "in", data)
            try:
                await upstream.send(data)
            except ConnectionClosed as closed:
                _upstream_closed(socket, closed)
                break
        done.cancel()

    async def _upstream_to_client(
        self, upstream: ClientConnection, send: Send, socket: _Socket, done: anyio.CancelScope
    ) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                data = await upstream.recv()
                self._count(socket, "out", data)
                if isinstance(data, str):
                    await send({"type": "websocket.send", "text": data})
                else:
                    await send({"type": "websocket.send", "bytes": data})
        except ConnectionClosed as closed:
            _upstream_closed(socket, closed)
        done.cancel()

    def _client_left(self, socket: _Socket, message: Message) -> None:
        code = int(message.get("code", 1005))
        reason = str(message.get("reason") or "")
        socket.decide("client", code, reason)
        socket.client_close = None
        if socket.upstream_close is not None:
            socket.upstream_close = (_on_the_wire(code, lost=GOING_AWAY), reason or "the client went away")

    async def _close(self, send: Send, socket: _Socket) -> None:
        """Send each side what is left of its close (shielded by the caller; each bounded)."""
        if socket.closed_by == "lmgate" and socket.code in (GOING_AWAY, INTERNAL):  # drain deadline, or a failure
            closing = (socket.code, socket.reason)
            socket.client_close = closing if socket.client_close is not None else None
            socket.upstream_close = closing if socket.upstream_close is not None else None
        upstream = socket.connection
        if upstream is not None and socket.upstream_close is not None:
            code, reason = socket.upstream_close
            with anyio.move_on_after(self.limits.close_timeout_s * 2):
                await upstream.close(code, reason[:120])  # aborts the connection itself after close_timeout
        if socket.client_close is not None:
            code, reason = socket.client_close
            with anyio.move_on_after(self.limits.close_timeout_s):
                await send({"type": "websocket.close", "code": code, "reason": reason[:120]})

    # -- telemetry -----------------------------------------------------------------------------

    def _count(self, socket: _Socket, direction: str, data: str | bytes) -> None:
        size = _size(data)
        socket.messages[direction] += 1
        socket.bytes[direction] += size
        if self.metrics is not None:
            self.metrics.messages.labels(socket.namespace, direction).inc()
            self.metrics.bytes.labels(socket.namespace, direction).inc(size)

    def _start_span(self, scope: Scope, socket: _Socket) -> Span | None:
        if self.tracer is None:
            return None
        return self.tracer.start_span(
            f"WebSocket {socket.namespace}", kind=SpanKind.SERVER,
            attributes={"url.path": socket.namespace, "network.protocol.name": "websocket"},
        )  # fmt: skip

    def _log_open(self, socket: _Socket) -> None:
        if self.metrics is not None:
            self.metrics.open.labels(socket.namespace, socket.upstream or "").inc()
        logger.info(
            "websocket %s open", socket.namespace,
            extra={"event": "ws_open", "namespace": socket.namespace, "upstream": socket.upstream,
                   "client_key": socket.identity},
        )  # fmt: skip

    def _finish(self, socket: _Socket, span: Span | None) -> None:
        duration_s = self.clock() - socket.opened_at
        code = socket.code if socket.code is not None else 1006
        fields = {
            "namespace": socket.namespace, "upstream": socket.upstream, "client_key": socket.identity,
            "closed_by": socket.closed_by, "code": code, "reason": socket.reason,
            "duration_ms": round(duration_s * 1000),
            "messages_in": socket.messages["in"], "messages_out": socket.messages["out"],
            "bytes_in": socket.bytes["in"], "bytes_out": socket.bytes["out"],
        }  # fmt: skip
        relayed = socket.relayed
        if self.metrics is not None:
            if relayed:
                self.metrics.open.labels(socket.namespace, socket.upstream or "").dec()
                self.metrics.duration.labels(socket.namespace).observe(duration_s)
            self.metrics.closes.labels(socket.namespace, socket.closed_by or "lmgate", WebSocketMetrics.code_label(code)).inc()
        if relayed:
            logger.info("websocket %s closed", socket.namespace, extra={"event": "ws_close", **fields})
        if span is not None:
            if span.is_recording():
                span.set_attributes({f"lmgate.websocket.{key}": value for key, value in fields.items() if value is not None})
                if socket.closed_by == "lmgate" and code != NORMAL:
                    span.set_status(Status(StatusCode.ERROR, socket.reason))
            span.end()


def _upstream_closed(socket: _Socket, closed: ConnectionClosed) -> None:
    socket.upstream_close = None  # websockets finished the closing handshake (or the connection is gone)
    if closed.sent is not None and closed.sent.code == TOO_BIG and closed.rcvd_then_sent is not True:
        socket.decide("lmgate", TOO_BIG, "upstream message larger than websockets.max_message_bytes")
        socket.client_close = (TOO_BIG, socket.reason)
        return
    code = closed.rcvd.code if closed.rcvd is not None else 1006
    reason = closed.rcvd.reason if closed.rcvd is not None else "the upstream connection was lost"
    socket.decide("upstream", code, reason)
    socket.client_close = (_on_the_wire(code, lost=INTERNAL), reason)


def _payload(message: Message) -> str | bytes | None:
    if message["type"] != "websocket.receive":
        return None
    text = message.get("text")
    return text if text is not None else message.get("bytes")


async def _deny(scope: Scope, send: Send, error: LmgateError) -> None:
    """Refuse an upgrade with an HTTP answer in the OpenAI shape (plain 403 without the extension)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": POLICY})
        return
    body = error_body(error)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *error.response_headers()]  # fmt: skip
    await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


class SdkSockets:
    """The SDK's entrance, above auth: ``websocket`` scopes go to ``relay``, and the SDK's probe
    (``GET /lmstudio-greeting``, sent without a key) is answered by lmgate itself when client keys
    are on and none came with it: the SDK probes before it sends any key, and an unauthenticated
    probe must not reach the upstream. Everything else continues down the stack.
    """

    def __init__(self, app: ASGIApp, *, relay: ASGIApp | None, keys_on: bool) -> None:
        self.app = app
        self.relay = relay
        self.keys_on = keys_on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.relay is not None:
            await self.relay(scope, receive, send)
        elif (
            scope["type"] == "http"
            and self.keys_on
            and route_path(scope) == GREETING
            and scope["method"] in ("GET", "HEAD")
            and presented_key(scope) is None
        ):
            body = json.dumps({"lmstudio": True}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
        else:
            await self.app(scope, receive, send)
