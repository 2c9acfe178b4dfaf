"""The simulator's own tasks (model loads, idle-TTL timers) and a handle on every request in flight.

Loads and TTL timers outlive the request that caused them (a load continues after its client
left; a TTL fires an hour after the last request), so they run in a task group owned here, not in a
request. Requests register a cancel scope so that stopping the simulator ends hung faults, hung
loads and waits on a FakeClock nobody advances at once, instead of holding the server's graceful
shutdown for its full timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup


class NotRunningError(RuntimeError):
    """The simulator was used before ``async with Simulator(...)`` (or the ASGI lifespan) started it."""


class Runtime:
    def __init__(self) -> None:
        self._task_group: TaskGroup | None = None
        self._requests: set[anyio.CancelScope] = set()

    @property
    def running(self) -> bool:
        return self._task_group is not None

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Own the background task group for the block; a nested call (lifespan under
        ``async with Simulator``) is a no-op, so either may start the simulator."""
        if self._task_group is not None:
            yield
            return
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            try:
                yield
            finally:
                self.stop_requests()
                tg.cancel_scope.cancel()
                self._task_group = None

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._task_group is None:
            raise NotRunningError(
                "the simulator is not running: use `async with Simulator(...)` or run the app's ASGI lifespan"
            )
        self._task_group.start_soon(func, *args)

    @contextmanager
    def request(self) -> Iterator[None]:
        scope = anyio.CancelScope()
        self._requests.add(scope)
        try:
            with scope:
                yield
        finally:
            self._requests.discard(scope)

    def stop_requests(self) -> None:
        for scope in list(self._requests):
            scope.cancel()
