"""One SDK websocket: handshake, auth packet, then RPCs and channels multiplexed on it.

The SDK opens one socket per namespace (``ws://host/llm``, ``/embedding``, ``/system``, ...). Its
first frame is the auth packet ``{"authVersion": 1, "clientIdentifier", "clientPasskey"}``, answered
``{"success": true}`` or ``{"success": false, "error": "<text>"}`` (lmstudio-js's
``wsAuthenticationResultSchema``). Every later frame is one JSON message:

* ``rpcCall {endpoint, callId, parameter}`` -> ``rpcResult {callId, result}`` or ``rpcError {callId, error}``;
* ``channelCreate {endpoint, channelId, creationParameter}`` -> ``channelSend {channelId, message}``
  packets, then ``channelClose`` (or ``channelError {channelId, error}``); the client's
  ``channelSend {message: {"type": "cancel"}}`` cancels the channel.

Calls and channels run concurrently, each in its own task; frames go out one at a time, and none
after the socket closed. A client that leaves counts as cancelling every open channel, which is
what LM Studio does with a prediction whose socket closed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from gateway.simulator.context import SimContext
from gateway.simulator.errors import SimError
from gateway.simulator.sdk.wire import SdkError, model_unloaded
from gateway.simulator.signals import Signals
from middleware.types import Receive, Scope, Send

log = logging.getLogger("gateway.simulator")

#: The namespaces LM Studio serves (lmstudio-python's sessions and lmstudio-js's ports). Any other
#: path is refused at the handshake (HTTP 403).
NAMESPACES = frozenset({"llm", "embedding", "system", "files", "repository", "plugins", "diagnostics", "runtime"})
#: A token as LM Studio issues it, split by the SDK (1.6+) into the auth packet's two fields.
_GUEST = re.compile(r"^(guest:.*|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")
#: Close code after a refused auth packet (policy violation), as a gateway refusing a key would send.
AUTH_REFUSED = 1008
#: Close code of the ``crash_mid_stream`` fault: the server went away mid-prediction.
CRASHED = 1011

#: What :func:`_next_json` returns once the client has left.
GONE = object()

TOKEN_REQUIRED = (
    "An LM Studio API token is required to connect to this server, but none was provided. "
    "Pass api_token to the client or set LMSTUDIO_API_TOKEN."
)
TOKEN_INVALID = "Invalid LM Studio API token provided. Ensure you are using a valid token."


class Socket:
    """The send side of an accepted websocket: one JSON text frame at a time, none after close."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = anyio.Lock()
        self.closed = False

    async def send(self, message: dict[str, Any]) -> None:
        async with self._lock:
            if not self.closed:
                await self._send({"type": "websocket.send", "text": json.dumps(message, separators=(",", ":"))})

    async def close(self, code: int, reason: str = "") -> None:
        async with self._lock:
            if not self.closed:
                self.closed = True
                await self._send({"type": "websocket.close", "code": code, "reason": reason})


class Channel:
    """One open channel: packets out, and the cancel that ends it (``signals``, as a client leaving)."""

    def __init__(self, socket: Socket, channel_id: int) -> None:
        self.socket = socket
        self.id = channel_id
        self.signals = Signals()

    @property
    def cancelled(self) -> bool:
        return self.signals.has_left

    def cancel(self) -> None:
        self.signals.client_left()

    async def send(self, packet: dict[str, Any]) -> None:
        await self.socket.send({"type": "channelSend", "channelId": self.id, "message": packet})


class Session:
    """What an endpoint handler sees: the simulator, the namespace and the socket."""

    def __init__(self, ctx: SimContext, namespace: str, socket: Socket) -> None:
        self.ctx = ctx
        self.namespace = namespace
        self.socket = socket
        self.channels: dict[int, Channel] = {}
        self.calls: set[Signals] = set()

    async def crash(self) -> None:
        """End the whole socket as a crashing server would (the ``crash_mid_stream`` fault)."""
        await self.socket.close(CRASHED, "The model has crashed")
        self.client_left()

    def client_left(self) -> None:
        self.socket.closed = True
        for channel in list(self.channels.values()):
            channel.cancel()
        for signals in list(self.calls):
            signals.client_left()


RpcHandler = Callable[[Session, Any, Signals], Awaitable[Any]]
ChannelHandler = Callable[[Session, Channel, Any], Awaitable[None]]


def auth_error(token: str | None, packet: Any) -> str | None:
    """Why the auth packet is refused (None: accepted). With a token set, the packet must carry it
    as the SDK splits it: ``sk-lm-<clientIdentifier>:<clientPasskey>``."""
    if not isinstance(packet, dict) or packet.get("authVersion") != 1:
        return "Invalid authentication packet."
    identifier, passkey = packet.get("clientIdentifier"), packet.get("clientPasskey")
    if not isinstance(identifier, str) or not isinstance(passkey, str):
        return "Invalid authentication packet."
    if token is None or f"sk-lm-{identifier}:{passkey}" == token:
        return None
    return TOKEN_REQUIRED if _GUEST.match(identifier) else TOKEN_INVALID


class SdkServer:
    """Serves ``websocket`` scopes with the endpoint tables of :mod:`gateway.simulator.sdk.endpoints`."""

    def __init__(
        self,
        ctx: SimContext,
        rpcs: dict[tuple[str, str], RpcHandler],
        channels: dict[tuple[str, str], ChannelHandler],
    ) -> None:
        self.ctx = ctx
        self.rpcs = rpcs
        self.channels = channels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        namespace = str(scope.get("path", "")).strip("/")
        counters = self.ctx.counters
        key = f"WEBSOCKET {scope.get('path', '')}"
        counters.routes = {**counters.routes, key: counters.routes.get(key, 0) + 1}
        if namespace not in NAMESPACES:
            await send({"type": "websocket.close", "code": AUTH_REFUSED})  # before accept: HTTP 403
            return
        await send({"type": "websocket.accept"})
        socket = Socket(send)
        packet = await _next_json(receive)
        if packet is GONE:
            return
        refused = auth_error(self.ctx.settings.api_token, packet)
        if refused is not None:
            await socket.send({"success": False, "error": refused})
            await socket.close(AUTH_REFUSED, "Authentication failed")
            return
        await socket.send({"success": True})
        session = Session(self.ctx, namespace, socket)
        try:
            async with anyio.create_task_group() as tg:
                while (message := await _next_json(receive)) is not GONE:
                    self._dispatch(session, message, tg)
                session.client_left()  # the handlers still running stop as for a client leaving
        finally:
            session.client_left()

    def _dispatch(self, session: Session, message: Any, tg: anyio.abc.TaskGroup) -> None:
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "rpcCall" and isinstance(message.get("callId"), int):
            tg.start_soon(self._rpc, session, str(message.get("endpoint")), message["callId"], message.get("parameter"))
        elif kind == "channelCreate" and isinstance(message.get("channelId"), int):
            opened = Channel(session.socket, message["channelId"])
            session.channels[opened.id] = opened
            tg.start_soon(self._channel, session, str(message.get("endpoint")), opened, message.get("creationParameter"))
        elif kind in ("channelSend", "channelClose"):
            # A cancel (or the client closing its side) for a channel that already ended is moot.
            channel = session.channels.get(message.get("channelId", -1))
            packet = message.get("message")
            if channel is not None and (kind == "channelClose" or (isinstance(packet, dict) and packet.get("type") == "cancel")):
                channel.cancel()
        else:
            # What LM Studio sends for a message it cannot place (signals are not simulated).
            warning = f"Unsupported message: {json.dumps(message)[:200]}"
            tg.start_soon(session.socket.send, {"type": "communicationWarning", "warning": warning})

    async def _rpc(self, session: Session, endpoint: str, call_id: int, parameter: Any) -> None:
        handler = self.rpcs.get((session.namespace, endpoint))
        signals = Signals()
        session.calls.add(signals)
        try:
            if handler is None:
                raise SdkError(f'No RPC endpoint "{endpoint}" in namespace "{session.namespace}".')
            result = await handler(session, parameter, signals)
        except (SdkError, SimError) as exc:
            await session.socket.send({"type": "rpcError", "callId": call_id, "error": _serialized(exc)})
            return
        finally:
            session.calls.discard(signals)
        answer: dict[str, Any] = {"type": "rpcResult", "callId": call_id}
        if result is not None:
            answer["result"] = result
        await session.socket.send(answer)

    async def _channel(self, session: Session, endpoint: str, channel: Channel, parameter: Any) -> None:
        handler = self.channels.get((session.namespace, endpoint))
        try:
            if handler is None:
                raise SdkError(f'No channel endpoint "{endpoint}" in namespace "{session.namespace}".')
            await handler(session, channel, parameter)
        except (SdkError, SimError) as exc:
            await session.socket.send({"type": "channelError", "channelId": channel.id, "error": _serialized(exc)})
        else:
            await session.socket.send({"type": "channelClose", "channelId": channel.id})
        finally:
            session.channels.pop(channel.id, None)


def _serialized(exc: SdkError | SimError) -> dict[str, Any]:
    if isinstance(exc, SdkError):
        return exc.error
    if exc.message == "Model unloaded.":
        return model_unloaded().error
    return SdkError.from_sim(exc).error


async def _next_json(receive: Receive) -> Any:
    """The next frame's JSON (``GONE`` once the client left). A frame that is not JSON is skipped."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return GONE
        data = message.get("text")
        if data is None and message.get("bytes") is not None:
            data = bytes(message["bytes"]).decode("utf-8", "replace")
        try:
            return json.loads(data or "")
        except ValueError:
            log.warning("SDK websocket: a frame that is not JSON was ignored")
