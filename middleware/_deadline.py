"""Tell a cancellation caused by an lmgate deadline from any other kind.

A layer inside the timeout (the circuit breaker) sees the timeout only as a cancellation of its
inner app. A deadline that passed means the upstream was too slow, a failure; a cancellation for
any other reason (the server shutting down, an outer layer giving up) says nothing about the
upstream. The timeout publishes its cancel scope in ``scope["state"]`` for the duration of the
inner call, so the question can be answered exactly rather than guessed from the clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio

from middleware.types import Scope

_KEY = "lmgate.deadline_scope"


def loop_clock() -> Callable[[], float]:
    """The clock cancel-scope deadlines are on, as a plain callable.

    ``anyio.current_time()`` asks sniffio which library runs, then the loop, on every call: about
    1.5 us, which a layer reading the clock for every streamed chunk pays thousands of times a
    second. On asyncio (and uvloop) anyio's clock is the running loop's ``time``, so that is
    returned; on another backend, anyio's own.
    """
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return anyio.current_time


@contextmanager
def deadline_published(scope: Scope, cancel_scope: anyio.CancelScope) -> Iterator[None]:
    """Make ``cancel_scope`` the deadline that :func:`deadline_expired` consults while inside."""
    state = scope.setdefault("state", {})
    previous = state.get(_KEY)
    state[_KEY] = cancel_scope
    try:
        yield
    finally:
        state[_KEY] = previous


def deadline_expired(scope: Scope) -> bool:
    """True when the cancellation being handled right now came from a deadline.

    Call it in an ``except`` for the cancellation exception. Without a published timeout (a layer
    used alone) it falls back to anyio's view: an enclosing scope whose deadline is due, which also
    counts scopes cancelled explicitly, so it is a best guess only.
    """
    cancel_scope = (scope.get("state") or {}).get(_KEY)
    if cancel_scope is not None:
        # lmgate's timeout never calls cancel() itself: cancel_called means its deadline passed.
        return bool(cancel_scope.cancel_called)
    return anyio.current_effective_deadline() <= anyio.current_time()
