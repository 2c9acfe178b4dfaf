"""Graceful drain: refuse new work, let running requests and streams finish, end the stragglers.

A rollout or Ctrl-C must not cut a stream mid-answer, yet a server cannot wait forever either
(hypercorn's own ``graceful_timeout`` is 3 s and then drops everything silently). The shutdown
sequence is therefore driven from the server's shutdown trigger, through a ``DrainState`` shared
with this middleware:

1. ``state.start()``: readiness (which reads ``state.draining``) answers 503 at once; new requests
   get 503 ``draining`` with ``Connection: close`` and ``Retry-After``; responses that start from
   now on carry ``Connection: close`` so keep-alive clients reconnect elsewhere.
2. ``await state.wait_idle(timeout_s)``: returns True as soon as every admitted request finished.
3. ``state.abort_remaining()``: cancels what is still running. Each request ends in the only honest
   shape left: a 503 ``draining`` if nothing was sent, an SSE ``event: error`` frame for an event
   stream, an aborted transfer for any other started body.
4. a short ``await state.wait_idle(...)``: a request is counted as in flight until its error frame
   has been handed to the server, so True here means every frame went out.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import anyio

from middleware.errors import Draining, error_layer_outside, raise_or_render
from middleware.response import ResponseState, header_value
from middleware.types import ASGIApp, Clock, Message, Receive, Scope, Send

__all__ = ["DrainMiddleware", "DrainState"]

_CUT_SHORT = "This gateway shut down before the response could finish; retry on another instance."


class DrainState:
    """Whether the process is draining, and the requests it is still waiting for.

    One instance is shared by ``DrainMiddleware`` (which registers each admitted request), the
    readiness endpoint (``draining``) and the server's shutdown trigger (``start``, ``wait_idle``,
    ``abort_remaining``). Creating it needs no running event loop.
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._started_at: float | None = None
        self._running: set[anyio.CancelScope] = set()
        self._idle: anyio.Event | None = None  # created on demand: Events need a running loop

    @property
    def draining(self) -> bool:
        return self._started_at is not None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def elapsed_s(self) -> float:
        """Seconds since draining started (0.0 before), for logs and the status page."""
        return 0.0 if self._started_at is None else self._clock() - self._started_at

    def start(self) -> None:
        """Begin draining; calling it again changes nothing (SIGTERM may follow SIGINT)."""
        if self._started_at is None:
            self._started_at = self._clock()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted request is running; False if ``timeout_s`` passed first."""
        with anyio.move_on_after(timeout_s):
            while self._running:
                if self._idle is None:
                    self._idle = anyio.Event()
                await self._idle.wait()
        return not self._running

    def abort_remaining(self) -> None:
        """Cancel every request still running; each ends itself as described in the module doc."""
        for cancel_scope in list(self._running):
            cancel_scope.cancel()

    @contextmanager
    def tracked(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope counted as in flight for the block: work that does not pass through
        ``DrainMiddleware`` (a WebSocket) but that a drain waits for and aborts at its deadline.
        The caller runs its work inside the scope and ends it its own way once cancelled."""
        cancel_scope = anyio.CancelScope()
        self._admit(cancel_scope)
        try:
            yield cancel_scope
        finally:
            self._finish(cancel_scope)

    def _admit(self, cancel_scope: anyio.CancelScope) -> None:
        self._running.add(cancel_scope)

    def _finish(self, cancel_scope: anyio.CancelScope) -> None:
        self._running.discard(cancel_scope)
        if not self._running and self._idle is not None:
            self._idle.set()
            self._idle = None


class DrainMiddleware:
    """Refuses requests once ``state.draining``; tracks admitted ones so a drain can wait for them.

    Options:
        state: the ``DrainState`` the server's shutdown trigger drives.
        retry_after_s: ``Retry-After`` on refusals; the client should come back via another
            instance, or to this one once it restarted.
        exempt_paths: paths served even while draining and not waited for (liveness, metrics).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: DrainState,
        retry_after_s: float = 5.0,
        exempt_paths: Collection[str] = (),
    ) -> None:
        if not retry_after_s >= 0:
            raise ValueError(f"retry_after_s must not be negative, not {retry_after_s!r}")
        self.app = app
        self.state = state
        self.retry_after_s = retry_after_s
        self.exempt_paths = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        outside = error_layer_outside(scope)
        if self.state.draining:
            await raise_or_render(Draining(retry_after_s=self.retry_after_s), send, ResponseState(), outside=outside)
            return
        response = ResponseState()

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.state.draining:
                headers = list(message.get("headers", ()))
                if header_value(headers, b"connection") is None:
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            response.observe(message)
            await send(message)

        cancel_scope = anyio.CancelScope()
        self.state._admit(cancel_scope)
        try:
            with cancel_scope:
                await self.app(scope, receive, closing_send)
            if cancel_scope.cancel_called:
                # Aborted at the drain deadline (no other code holds this scope).
                error = Draining(_CUT_SHORT, retry_after_s=self.retry_after_s)
                await raise_or_render(error, send, response, outside=outside)
        finally:
            self.state._finish(cancel_scope)
