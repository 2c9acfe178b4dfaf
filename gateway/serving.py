"""Run an ASGI app on hypercorn inside a running event loop (tests, the simulator, the CLI).

The listening socket is bound before hypercorn starts, so the caller knows the real port at once
(port 0 picks a free one) and a client may connect immediately: the kernel queues the connection
until hypercorn accepts it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets

from gateway.connections import ConnectionLimiter, GuardedListener, track_connections
from middleware.types import ASGIApp

# Connections the kernel queues before hypercorn accepts them: a burst of clients (or NGINX
# opening its upstream connections at once) beyond it is reset.
LISTEN_BACKLOG = 1024


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


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

    if getattr(TCPServer._read_data, "_lmgate_closes_at_eof", False):
        return
    read_data = TCPServer._read_data

    async def read_then_stop_idle_timer(self: TCPServer) -> None:
        try:
            await read_data(self)
        finally:
            await self.idle_task.stop()

    read_then_stop_idle_timer._lmgate_closes_at_eof = True  # type: ignore[attr-defined]
    TCPServer._read_data = read_then_stop_idle_timer  # type: ignore[method-assign]


class _GuardedConfig(HypercornConfig):
    """hypercorn's config, serving one :class:`GuardedListener` and carrying its limiter."""

    def __init__(self, listener: GuardedListener) -> None:
        super().__init__()
        self.listener = listener
        # Read by the connection tracking in gateway.connections (track_connections).
        self.lmgate_connections = listener.connections

    def create_sockets(self) -> Sockets:
        # hypercorn closes the sockets it is given on shutdown.
        return Sockets(secure_sockets=[], insecure_sockets=[self.listener], quic_sockets=[])


def hypercorn_config(
    sock: socket.socket, *, graceful_timeout_s: float = 5.0, connections: ConnectionLimiter | None = None
) -> HypercornConfig:
    """hypercorn set up to serve ``sock`` (which it adopts), capped by ``connections`` if given.

    Without ``connections`` there is no cap, but running out of descriptors is still handled
    (gateway/connections.py).
    """
    close_idle_connections_at_eof()
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
        tg.start_soon(lambda: serve(app, config, shutdown_trigger=trigger))  # type: ignore[arg-type]
        try:
            yield RunningServer(format_url(host, bound_port), host, bound_port, stopped.set)
        finally:
            stopped.set()
