"""Run an ASGI app on hypercorn inside a running event loop (tests, the simulator, the CLI).

The listening socket is bound before hypercorn starts, so the caller knows the real port at once
(port 0 picks a free one) and a client may connect immediately: the kernel queues the connection
until hypercorn accepts it.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.typing import ASGIFramework

from gateway.server.connections import ConnectionLimiter, GuardedListener, track_connections
from gateway.server.patching import is_patched, patch_method
from gateway.server.websocket_close import keep_websocket_close_codes
from middleware.disconnect import DISCONNECT_EXTENSION, DisconnectSignal
from middleware.types import ASGIApp

# Connections the kernel queues before hypercorn accepts them: a burst of clients (or NGINX
# opening its upstream connections at once) beyond it is reset.
LISTEN_BACKLOG = 1024


class ListenError(OSError):
    """No listening socket on ``host:port``; ``str()`` is one line that says what to do."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.host, self.port, self.cause = host, port, cause

    def __str__(self) -> str:
        address = format_url(self.host, self.port).removeprefix("http://")
        return f"cannot listen on {address}: {_listen_advice(self.cause, self.port)}"


def _listen_advice(cause: OSError, port: int) -> str:
    if isinstance(cause, socket.gaierror):
        return "no such host name; pass --host with an address of this machine (127.0.0.1 by default)"
    if cause.errno == errno.EADDRINUSE:
        return "address already in use; stop the other process or pass --port"
    if cause.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address; pass --host with one of its addresses (127.0.0.1 by default)"
    if cause.errno == errno.EACCES and 0 < port < 1024:
        return "permission denied (ports below 1024 need privileges); pass --port 1024 or above"
    return cause.strerror or str(cause)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host has a colon).

    Raises ``ListenError`` (an ``OSError``) when the address cannot be had: a port in use, an
    address this machine does not have, a privileged port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(host, port, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def hypercorn_app(app: ASGIApp) -> ASGIFramework:
    """``app`` as hypercorn types it: the same callable. hypercorn declares scopes and events as
    TypedDicts, which mypy does not accept for the ``MutableMapping`` that Starlette's ASGI types
    and ours (middleware.types) take, though at run time they are the same dicts."""
    return cast("ASGIFramework", app)


def format_url(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def close_idle_connections_at_eof() -> None:
    """Make hypercorn close a keep-alive connection as soon as its client closes it.

    hypercorn 0.18's asyncio server keeps its keep-alive timer running after the read loop has
    seen the client's EOF, and closes the socket only when the timer ends: every client that
    closes an idle connection leaves a socket in CLOSE-WAIT for ``keep_alive_timeout`` (75 s
    here). Clients that open a connection per request would run lmgate out of descriptors. The
    timer is stopped once the read loop ends, which lets hypercorn close the socket at once.
    Idempotent; tested in tests/gateway/test_serving.py.
    """
    from hypercorn.asyncio.tcp_server import TCPServer

    if is_patched(TCPServer._read_data, "_lmgate_closes_at_eof"):
        return
    read_data = TCPServer._read_data

    async def read_then_stop_idle_timer(self: TCPServer) -> None:
        try:
            await read_data(self)
        finally:
            await self.idle_task.stop()

    patch_method(TCPServer, "_read_data", read_then_stop_idle_timer, marker="_lmgate_closes_at_eof")


def drop_sends_to_closed_streams() -> None:
    """Make hypercorn drop what an app sends once the client's connection is gone.

    hypercorn 0.18 marks a stream closed when its connection is lost (and queues
    ``http.disconnect``), but still writes every later ``http.response.body`` to the dead socket,
    and asyncio logs "socket.send() raised exception." for each write past the fifth. An app
    draining a backlog (the proxy relaying upstream chunks that arrived while the loop was busy)
    never suspends between such sends, since the failed write returns at once, so it cannot even
    receive the ``http.disconnect`` waiting for it: 500 clients leaving at once logged tens of
    thousands of lines. Dropped once closed, the sends cost nothing until the app notices.
    Idempotent; tested in tests/gateway/test_serving.py.
    """
    from hypercorn.protocol.http_stream import HTTPStream

    if is_patched(HTTPStream.app_send, "_lmgate_drops_when_closed"):
        return
    app_send = HTTPStream.app_send

    async def app_send_while_open(self: HTTPStream, message: Any) -> None:
        # ``closed`` is also set once the response is complete, when no body may follow anyway.
        if self.closed and message is not None and message["type"] == "http.response.body":
            return
        await app_send(self, message)

    patch_method(HTTPStream, "app_send", app_send_while_open, marker="_lmgate_drops_when_closed")


def signal_disconnects() -> None:
    """Give every HTTP request a :class:`~middleware.disconnect.DisconnectSignal` in its scope.

    hypercorn reports a client that left only by queueing ``http.disconnect`` for ``receive()``,
    so a layer waiting on something else (the upstream) needs a task reading ``receive()`` beside
    it: an anyio task group and a task per request, about 50 us of CPU on uvloop. With the signal,
    hypercorn's own ``http.disconnect`` calls the layers' callbacks (``cancel_on_disconnect``)
    directly. The message is still queued, for layers that read ``receive()``. Idempotent; tested
    in tests/gateway/test_serving.py.
    """
    from hypercorn.asyncio.task_group import TaskGroup

    if is_patched(TaskGroup.spawn_app, "_lmgate_signals_disconnects"):
        return
    spawn_app = TaskGroup.spawn_app

    async def spawn_app_with_signal(self: TaskGroup, app: Any, config: Any, scope: Any, send: Any) -> Any:
        if scope.get("type") != "http":
            return await spawn_app(self, app, config, scope, send)
        signal = DisconnectSignal()
        scope.setdefault("extensions", {})[DISCONNECT_EXTENSION] = signal
        put = await spawn_app(self, app, config, scope, send)

        async def put_and_signal(message: Any) -> None:
            if message["type"] == "http.disconnect":
                signal.set()
            await put(message)

        return put_and_signal

    patch_method(TaskGroup, "spawn_app", spawn_app_with_signal, marker="_lmgate_signals_disconnects")


class _GuardedConfig(HypercornConfig):
    """hypercorn's config, serving one :class:`GuardedListener` and carrying its limiter."""

    def __init__(self, listener: GuardedListener) -> None:
        super().__init__()
        self.listener = listener
        # Read by the connection tracking in gateway.server.connections (track_connections).
        self.lmgate_connections = listener.connections

    def create_sockets(self) -> Sockets:
        # hypercorn closes the sockets it is given on shutdown.
        return Sockets(secure_sockets=[], insecure_sockets=[self.listener], quic_sockets=[])


def hypercorn_config(
    sock: socket.socket, *, graceful_timeout_s: float = 5.0, connections: ConnectionLimiter | None = None
) -> HypercornConfig:
    """hypercorn set up to serve ``sock`` (which it adopts), capped by ``connections`` if given.

    Without ``connections`` there is no cap, but running out of descriptors is still handled
    (gateway/server/connections.py).
    """
    close_idle_connections_at_eof()
    drop_sends_to_closed_streams()
    signal_disconnects()
    keep_websocket_close_codes()  # the SDK sockets' relay carries a client's close code upstream
    track_connections()
    config = _GuardedConfig(GuardedListener.adopt(sock, connections or ConnectionLimiter()))
    config.graceful_timeout = graceful_timeout_s
    # hypercorn calls listen() again with its own backlog (default 100), overriding bind_socket's.
    config.backlog = LISTEN_BACKLOG
    # Model loads and long prefill keep a request silent for minutes: no server-side read cut.
    config.read_timeout = None
    config.keep_alive_timeout = 75.0
    # Neither LM Studio nor a gateway in front of it should advertise its server software.
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


@dataclass
class RunningServer:
    url: str
    host: str
    port: int
    stop: Callable[[], None]


@asynccontextmanager
async def serve_in_background(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    graceful_timeout_s: float = 5.0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    connections: ConnectionLimiter | None = None,
) -> AsyncIterator[RunningServer]:
    """Serve ``app`` until the block exits (or ``shutdown_trigger`` returns), then shut down."""
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    config = hypercorn_config(sock, graceful_timeout_s=graceful_timeout_s, connections=connections)
    stopped = anyio.Event()

    async def trigger() -> None:
        if shutdown_trigger is None:
            await stopped.wait()
            return
        async with anyio.create_task_group() as tg:
            async def on_stop() -> None:
                await stopped.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(on_stop)
            await shutdown_trigger()
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(hypercorn_app(app), config, shutdown_trigger=trigger))
        try:
            yield RunningServer(format_url(host, bound_port), host, bound_port, stopped.set)
        finally:
            stopped.set()
