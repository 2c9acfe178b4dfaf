"""Client connections: a cap below the open-files limit, and what happens at it.

Every client connection is a file descriptor. Without a cap, enough idle connections (1,100 under
the default limit of 1,024) leave lmgate with no descriptor for the next ``accept()``. asyncio
then logs a traceback for every failed ``accept()``: its accept loop keeps calling ``accept()``
after the first failure, and schedules a retry for each one (python/cpython#151615). That gave
hundreds of thousands of tracebacks a minute, a busy core, and a ``/healthz`` nobody could reach
until the idle connections timed out.

So lmgate:

* raises its soft ``RLIMIT_NOFILE`` to the hard limit at start-up (:func:`raise_open_files_limit`);
* caps client connections at ``listen.max_connections``, by default the open-files limit less
  what upstream connections and lmgate's own files need (:func:`connection_cap`);
* at the cap, closes the connection that has been idle longest (no request in flight: a
  keep-alive connection, or one that has not finished sending its headers) to admit the new one,
  as NGINX does with its keep-alive connections. A health check on a fresh connection is answered
  however many idle connections a client holds open. When no connection is idle, the new one is
  closed at once, so the client can go elsewhere instead of waiting in the listen queue;
* when descriptors run short all the same (they went to something else), closes idle connections
  to make room, and keeps the event loop from flooding the log;
* logs one JSON line when connections run out (``connections_exhausted``) and one when they
  have been quiet for a few seconds (``connections_recovered``), never one per connection.

The decision is taken where hypercorn starts a connection (:func:`track_connections` patches its
``TCPServer.run``), the one place both event loops reach: asyncio's loop calls ``accept()`` on the
Python socket object, but uvloop's libuv accepts in C and never does. A connection is admitted
just after its ``accept()``, at most a turn or two of the loop later.

Running out of descriptors is seen differently on each loop:

* asyncio: ``accept()`` fails with ``EMFILE``. :class:`GuardedListener` (the listening socket
  hypercorn serves) closes idle connections and hands asyncio the error once, which pauses
  accepting for a second, without asyncio's tracebacks.
* uvloop: libuv never reports it. On ``EMFILE`` it closes a descriptor it keeps in reserve,
  accepts and at once closes every connection waiting in the listen queue, and takes the reserve
  back (its "EMFILE trick"): silent, and those clients see a reset. lmgate notices earlier, from
  the number of each new connection's descriptor: POSIX hands out the lowest free number, so a
  descriptor within ``DESCRIPTOR_HEADROOM`` of the limit means at most that many are left. The
  cap then comes down to keep that many free (closing the longest idle connections), until
  connections have been quiet for ``QUIET_S``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable, Hashable
from typing import Any

from gateway.config.settings import Config, ConfigError
from gateway.server.patching import is_patched, patch_method

try:
    import resource

    _HAVE_RLIMIT = True
except ImportError:  # Windows: no RLIMIT_NOFILE, and its event loop accepts differently
    _HAVE_RLIMIT = False

logger = logging.getLogger("lmgate.connections")

#: Descriptors kept for lmgate itself beyond upstream connections: the listening socket, the event
#: loop's own, standard streams, an OTLP exporter, files read at run time, and connections over the
#: cap between their ``accept()`` and their admission (refused, or let in by closing an idle one).
RESERVED_DESCRIPTORS = 64
#: Fewer client connections than this is a limit lmgate cannot serve under.
MIN_CONNECTIONS = 16
#: Idle connections closed at once when asyncio's ``accept()`` fails for lack of descriptors.
EVICTION_BURST = 16
#: Descriptors kept free: a new connection whose descriptor is this close to the open-files limit
#: (at most this many left, since descriptors are numbered lowest free first) lowers the cap.
DESCRIPTOR_HEADROOM = 16
#: How long nothing must have been evicted, refused or failed before connections count as recovered.
QUIET_S = 5.0
# accept() errors that mean "no descriptor or memory for a new socket" (asyncio's list).
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# What asyncio's default exception handler logs for those; lmgate logs the episode once instead.
_ASYNCIO_ACCEPT_MESSAGE = "socket.accept() out of system resource"


def raise_open_files_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit where allowed; the soft limit in effect.

    None where the platform has no such limit. An unprivileged process may always raise its soft
    limit up to the hard one; only the hard limit (systemd's ``LimitNOFILE``, docker's ``--ulimit
    nofile``) needs the operator.
    """
    if not _HAVE_RLIMIT:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an infinite hard limit but refuses soft limits above its per-process maximum.
    targets = (hard,) if hard != resource.RLIM_INFINITY else (1 << 20, 10240)
    for target in targets:
        if soft != resource.RLIM_INFINITY and target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                continue
            return target
    return soft if soft != resource.RLIM_INFINITY else None


def connection_cap(config: Config, *, simulate: bool = False) -> int | None:
    """Raise the open-files limit, then return ``listen.max_connections`` or its default.

    The default is the open-files limit less the upstream pool (every upstream's, ``Config.total_pool_connections``;
    twice that with the built-in simulator, whose side of each upstream connection is in the same
    process) and ``RESERVED_DESCRIPTORS``; with an unbounded pool, each client connection is counted
    with the upstream connection it may hold. Raises ``ConfigError`` when the limit cannot hold the configured
    cap, or leaves room for fewer than ``MIN_CONNECTIONS``. None: no limit on this platform.
    """
    limit = raise_open_files_limit()
    configured = config.listen.max_connections
    if limit is None:
        return configured
    # The built-in simulator holds the other end of each upstream connection in this process.
    per_upstream = 2 if simulate else 1
    pool = config.total_pool_connections()
    if pool is None:
        # An unbounded pool (no total concurrency limit): each client connection may hold one
        # upstream connection, so the descriptors left are shared between the two.
        reserved = RESERVED_DESCRIPTORS
        room = (limit - reserved) // (1 + per_upstream)
    else:
        reserved = pool * per_upstream + RESERVED_DESCRIPTORS
        room = limit - reserved
    how = (
        "raise the open-files limit (LimitNOFILE= in the systemd unit, docker run --ulimit nofile=N:N, "
        "ulimit -n N in a shell; see docs/production.md)"
    )
    if configured is not None and configured > room:
        raise ConfigError(
            f"listen.max_connections: expected at most {max(room, 0)} with an open-files limit of {limit} "
            f"({reserved} of them kept for upstream connections and lmgate itself), got {configured}; "
            f"{how} or lower listen.max_connections"
        )
    if configured is None and room < MIN_CONNECTIONS:
        raise ConfigError(
            f"listen.max_connections: the open-files limit of {limit} leaves room for {max(room, 0)} client "
            f"connections once {reserved} are kept for upstream connections (upstream.pool.max_connections) "
            f"and lmgate itself; expected room for at least {MIN_CONNECTIONS}: {how} or lower "
            f"upstream.pool.max_connections"
        )
    cap = configured if configured is not None else room
    logger.info(
        "accepting up to %d client connections (open-files limit %d)",
        cap,
        limit,
        extra={"event": "connection_limits", "max_connections": cap, "open_files_limit": limit},
    )
    return cap


class ConnectionLimiter:
    """The client connections of one listener: how many are open, which are idle, and the cap.

    ``admit()`` is asked when hypercorn starts a connection; an admitted connection then reports
    ``busy``/``idle`` as requests start and end, and ``closed``. Keys are the connection objects;
    the ``close`` given to ``admit`` is what ends one that is evicted. ``max_connections`` None: no
    cap (only running out of descriptors is handled).
    """

    def __init__(
        self,
        max_connections: int | None = None,
        *,
        quiet_s: float = QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.quiet_s = quiet_s
        self.clock = clock
        self.open = 0
        # Read once: connection_cap() has raised the soft limit before the limiter is made.
        limit = _soft_limit()
        finite = limit is not None and limit != resource.RLIM_INFINITY
        self._last_descriptor = limit - 1 - DESCRIPTOR_HEADROOM if finite and limit else None
        self._descriptor_cap: int | None = None  # set while descriptors are short (_short_of_descriptors)
        self._close: dict[Hashable, Callable[[], None]] = {}
        self._idle: dict[Hashable, None] = {}  # insertion order: longest idle first
        self._evicting: set[Hashable] = set()
        self._exhausted_at: float | None = None
        self._last_trouble = 0.0
        self._evicted = 0
        self._refused = 0
        # Since start-up, for metrics (the two above count one episode of trouble, for its log line).
        self.evicted_total = 0
        self.refused_total = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def exhausted(self) -> bool:
        return self._exhausted_at is not None

    def admit(self, key: Hashable, close: Callable[[], None], descriptor: int = -1) -> bool:
        """A connection is starting: True, it is registered; False, the caller closes it at once.

        ``descriptor`` is its socket's number (-1: unknown), which tells how many are left.
        """
        if self._last_descriptor is not None and descriptor > self._last_descriptor:
            self._short_of_descriptors(descriptor)
        cap = self.cap
        if cap is not None and self._staying() >= cap:
            if cap == self.max_connections:
                self._trouble("max_connections")
            else:
                self._last_trouble = self.clock()
            # One out for one in at the cap; more when the descriptors' cap has just come down.
            while self._staying() >= cap and self._evict_longest_idle():
                pass
            if self._staying() >= cap:
                self._refused += 1
                self.refused_total += 1
                return False
        self.open += 1
        self._close[key] = close
        self._idle[key] = None  # idle until its first request has arrived whole
        return True

    def _staying(self) -> int:
        """Connections open and not being closed to make room."""
        return self.open - len(self._evicting)

    @property
    def cap(self) -> int | None:
        """The cap in force: ``max_connections``, or lower while descriptors are short."""
        if self._descriptor_cap is None:
            return self.max_connections
        if self.max_connections is None:
            return self._descriptor_cap
        return min(self.max_connections, self._descriptor_cap)

    def _short_of_descriptors(self, descriptor: int) -> None:
        """A new connection got ``descriptor``, inside the headroom: cap connections below it.

        Every number below it is taken, so at most ``left`` are free. The cap is set to leave
        ``DESCRIPTOR_HEADROOM`` free, counting this connection: without one, the next connections
        would fill the rest and libuv would shed every one after them, unseen. In a burst accepted
        in one turn, later descriptors were numbered before the evictions for earlier ones, so the
        cap may come down by up to ``DESCRIPTOR_HEADROOM`` more than needed; it is lifted once
        connections have been quiet for ``quiet_s``.
        """
        assert self._last_descriptor is not None
        left = self._last_descriptor + DESCRIPTOR_HEADROOM - descriptor
        self._trouble("open_files", descriptors_left=left)
        self._descriptor_cap = max(self._staying() + 1 - (DESCRIPTOR_HEADROOM - left), 1)

    def out_of_descriptors(self, code: int) -> None:
        """``accept()`` failed with ``code`` (EMFILE...): free descriptors held by idle connections."""
        self._trouble("open_files", errno=errno.errorcode.get(code, str(code)))
        for _ in range(EVICTION_BURST):
            if not self._evict_longest_idle():
                break

    def busy(self, key: Hashable) -> None:
        self._idle.pop(key, None)

    def idle(self, key: Hashable) -> None:
        if key in self._close and key not in self._evicting:
            self._idle.pop(key, None)
            self._idle[key] = None

    def closed(self, key: Hashable) -> None:
        self._close.pop(key, None)
        self._idle.pop(key, None)
        self._evicting.discard(key)
        self.open -= 1

    def _evict_longest_idle(self) -> bool:
        if not self._idle:
            return False
        key = next(iter(self._idle))
        del self._idle[key]
        self._evicting.add(key)
        self._evicted += 1
        self.evicted_total += 1
        self._close[key]()  # the transport closes its socket (uvloop: now; asyncio: early next turn)
        return True

    def _trouble(self, reason: str, **fields: Any) -> None:
        now = self.clock()
        self._last_trouble = now
        if self._exhausted_at is not None:
            return
        self._exhausted_at = now
        if reason == "max_connections":
            message = (
                "client connections reached listen.max_connections: the longest idle ones are closed to "
                "admit new ones, and new ones are refused while none is idle"
            )
        else:
            message = "out of file descriptors, or nearly: the longest idle connections are closed to make room"
        logger.warning(
            message,
            extra={
                "event": "connections_exhausted",
                "reason": reason,
                "open_connections": self.open,
                "max_connections": self.max_connections,
                "open_files_limit": _soft_limit(),
                **fields,
            },
        )
        self._check_later(self.quiet_s)

    def _check_later(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check_recovery)

    def _check_recovery(self) -> None:
        self._timer = None
        if self._exhausted_at is None:
            return
        now = self.clock()
        quiet_for = now - self._last_trouble
        cap = self.cap
        below_cap = cap is None or self._staying() < cap
        if quiet_for < self.quiet_s or not below_cap:
            self._check_later(max(self.quiet_s - quiet_for, self.quiet_s / 10))
            return
        logger.info(
            "client connections recovered",
            extra={
                "event": "connections_recovered",
                "open_connections": self.open,
                "max_connections": self.max_connections,
                "exhausted_s": round(now - self._exhausted_at, 3),
                "evicted": self._evicted,
                "refused": self._refused,
            },
        )
        self._exhausted_at = None
        self._evicted = self._refused = 0
        self._descriptor_cap = None


def _soft_limit() -> int | None:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] if _HAVE_RLIMIT else None


class GuardedListener(socket.socket):
    """A listening socket whose ``accept()`` keeps asyncio calm when descriptors run out.

    asyncio's event loop calls ``accept()`` on the socket object it serves (uvloop does not: it
    only uses the descriptor). When ``accept()`` fails for lack of descriptors, idle connections
    are closed and the error goes to asyncio once, which stops watching the socket for a second
    (its ``ACCEPT_RETRY_DELAY``); the calls asyncio makes after it in the same turn are told there
    is nothing to accept, so no retry is scheduled twice. The cap itself is applied when hypercorn
    starts the connection (:func:`track_connections`).
    """

    connections: ConnectionLimiter
    _backing_off: bool

    @classmethod
    def adopt(cls, sock: socket.socket, connections: ConnectionLimiter) -> GuardedListener:
        """Take over ``sock`` (a bound, listening socket; it is detached)."""
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.connections = connections
        listener._backing_off = False
        quiet_asyncio_accept_errors()
        return listener

    def accept(self) -> tuple[socket.socket, Any]:
        if self._backing_off:
            raise BlockingIOError(errno.EAGAIN, "accepting is paused: out of descriptors")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            self.connections.out_of_descriptors(exc.errno)
            self._backing_off = True
            asyncio.get_running_loop().call_soon(self._end_back_off)
            raise

    def _end_back_off(self) -> None:
        self._backing_off = False


class _DropAsyncioAcceptErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ASYNCIO_ACCEPT_MESSAGE)


def quiet_asyncio_accept_errors() -> None:
    """Drop asyncio's traceback for an ``accept()`` out of descriptors (idempotent).

    :class:`GuardedListener` hands asyncio one such error per pause, so that asyncio pauses;
    :class:`ConnectionLimiter` logs the episode as one JSON line instead.
    """
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAsyncioAcceptErrors) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropAsyncioAcceptErrors())


def track_connections() -> None:
    """Make hypercorn's asyncio connections ask their server's ``ConnectionLimiter`` (idempotent).

    A connection is admitted (or closed at once) when it starts and leaves when it ends; hypercorn's
    own ``Updated`` events (``idle=False`` once a request's headers are in, ``idle=True`` once its
    response is done and the connection is kept alive) say whether it may be evicted. This runs on
    asyncio's loop and on uvloop alike. Servers whose hypercorn config has no
    ``lmgate_connections`` are untouched.
    """
    from hypercorn.asyncio.tcp_server import TCPServer
    from hypercorn.events import Updated

    if is_patched(TCPServer.run, "_lmgate_tracked"):
        return
    run, protocol_send = TCPServer.run, TCPServer.protocol_send

    async def tracked_run(self: TCPServer) -> None:
        limiter: ConnectionLimiter | None = getattr(self.config, "lmgate_connections", None)
        if limiter is None:
            await run(self)
            return
        sock = self.writer.get_extra_info("socket")
        descriptor = sock.fileno() if sock is not None else -1
        # Closing the transport ends the read loop with an EOF, and hypercorn closes as usual.
        if not limiter.admit(self, self.writer.close, descriptor):
            # Over the cap with nothing idle to close: refused before a byte is read, so the
            # client can go elsewhere at once.
            self.writer.transport.abort()
            return
        try:
            await run(self)
        finally:
            limiter.closed(self)

    async def tracked_protocol_send(self: TCPServer, event: Any) -> None:
        limiter: ConnectionLimiter | None = getattr(self.config, "lmgate_connections", None)
        if limiter is not None and isinstance(event, Updated):
            (limiter.idle if event.idle else limiter.busy)(self)
        await protocol_send(self, event)

    patch_method(TCPServer, "protocol_send", tracked_protocol_send, marker="_lmgate_tracked")
    patch_method(TCPServer, "run", tracked_run, marker="_lmgate_tracked")  # last: the one is_patched asks
