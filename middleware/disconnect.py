"""Run a block while watching the client, and a background task beside a block, without task-group noise.

Several layers wait on something that is not the client (a queue slot, a model load, a backoff, the
upstream's stream) and must stop at once when the client leaves. hypercorn reports that only
through ``receive()``, so something has to wait on it alongside the work::

    await read_body(scope, receive)          # the body first: one reader of receive() at a time
    async with cancel_on_disconnect(replaying_receive(scope, receive)) as watch:
        await wait_for_the_slot()
    if watch.disconnected:
        raise ClientDisconnected()

The block is cancelled when ``http.disconnect`` arrives, and the ``async with`` then ends normally
with ``watch.disconnected`` set; the caller decides what a disconnect means. Servers send
``http.disconnect`` after a complete response too, so a block that sends the response should tell
a client that left from one that was served (the proxy does, by noting that its exchange finished).

Only one party may wait on ``receive()`` at a time: the request body must be read before the watch
starts, and the block must not call ``receive()`` itself. Messages other than ``http.disconnect``
(a replayed body) are skipped.

:func:`run_beside` is the same machinery for any background task (the heartbeat's ticker): the task
runs while the block runs and is cancelled when it ends. Neither lets an ``ExceptionGroup`` out: an
exception from the block propagates as itself, and so does one from the background task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup

from middleware.types import Receive

__all__ = ["cancel_on_disconnect", "run_beside"]


class run_beside:
    """Run ``task()`` in the background while the ``async with`` block runs; cancel it when the block ends.

    When ``task`` returns early the block goes on; when it raises, the block is cancelled and the
    task's exception propagates (unwrapped). :meth:`cancel_block` lets the task end the block early.
    """

    def __init__(self, task: Callable[[], Awaitable[None]]) -> None:
        self._task = task
        self._group: TaskGroup | None = None
        self._error: Exception | None = None

    async def __aenter__(self) -> Self:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._run)
        return self

    async def _run(self) -> None:
        try:
            await self._task()
        except Exception as error:  # re-raised by __aexit__, outside the task group
            self._error = error
            self.cancel_block()

    def cancel_block(self) -> None:
        """Cancel the block (and the task); the ``async with`` then ends without an exception."""
        if self._group is not None:
            self._group.cancel_scope.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        group, self._group = self._group, None
        assert group is not None, "run_beside was not entered"
        group.cancel_scope.cancel()  # the task ends with the block
        if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
            # The block's own failure: let the group wind down as if the block had ended cleanly
            # (it would wrap the exception in an ExceptionGroup), then let the exception go on.
            await group.__aexit__(None, None, None)
            return False
        # No exception, or a cancellation: the group's scope absorbs the one it caused itself.
        suppressed = await group.__aexit__(exc_type, exc, tb)
        if self._error is not None:
            raise self._error
        return bool(suppressed)


class cancel_on_disconnect:
    """Cancel the ``async with`` block when ``receive()`` delivers ``http.disconnect``; see the module doc.

    ``disconnected`` says whether it did (``async with`` gives the object itself, so a caller that
    needs the answer in an ``except`` can create it before the ``try``).
    """

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self._receive = receive
        self._beside = run_beside(self._wait_for_disconnect)

    async def _wait_for_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        self._beside.cancel_block()

    async def __aenter__(self) -> Self:
        await self._beside.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return await self._beside.__aexit__(exc_type, exc, tb)
