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

:class:`DisconnectSignal` is the cheap way: a server that puts one in the scope's extensions
(``scope["extensions"]["lmgate.disconnect"]``, as lmgate's hypercorn set-up does) calls it when the
client goes, and the watch is a cancel scope plus a callback, with no task beside the block. A task
group with one task costs about 50 us of CPU per request on uvloop, the callback about 1 us; the
proxy watches every request. Pass ``scope=`` to use the signal when the server provides one; any
other server gets the watcher task.

:func:`run_beside` is the same machinery for any background task: the task
runs while the block runs and is cancelled when it ends. Neither lets an ``ExceptionGroup`` out: an
exception from the block propagates as itself, and so does one from the background task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from middleware.types import Receive

__all__ = ["DISCONNECT_EXTENSION", "DisconnectSignal", "cancel_on_disconnect", "run_beside"]

# The scope extension under which a server offers a DisconnectSignal for the request.
DISCONNECT_EXTENSION = "lmgate.disconnect"


class DisconnectSignal:
    """Set by the server when the client of one request is gone (when it queues ``http.disconnect``).

    Callbacks registered with :meth:`watch` run once, synchronously, in the event loop's thread;
    one registered after the signal was set runs at once.
    """

    __slots__ = ("is_set", "_callbacks")

    def __init__(self) -> None:
        self.is_set = False
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        if self.is_set:
            return
        self.is_set = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def watch(self, callback: Callable[[], None]) -> None:
        if self.is_set:
            callback()
        else:
            self._callbacks.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)


def disconnect_signal(scope: MutableMapping[str, Any] | None) -> DisconnectSignal | None:
    """The server's :class:`DisconnectSignal` for this request, if it offers one."""
    if scope is None:
        return None
    signal = (scope.get("extensions") or {}).get(DISCONNECT_EXTENSION)
    return signal if isinstance(signal, DisconnectSignal) else None


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
    needs the answer in an ``except`` can create it before the ``try``). With ``scope`` whose server
    offers a :class:`DisconnectSignal`, no task watches ``receive()``: the signal cancels the block.
    """

    def __init__(self, receive: Receive, *, scope: MutableMapping[str, Any] | None = None) -> None:
        self.disconnected = False
        self._receive = receive
        self._signal = disconnect_signal(scope)
        self._beside = run_beside(self._wait_for_disconnect) if self._signal is None else None
        self._cancel_scope: anyio.CancelScope | None = None

    async def _wait_for_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        assert self._beside is not None
        self._beside.cancel_block()

    def _on_signal(self) -> None:
        self.disconnected = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def __aenter__(self) -> Self:
        if self._beside is not None:
            await self._beside.__aenter__()
            return self
        assert self._signal is not None
        self._cancel_scope = anyio.CancelScope().__enter__()
        self._signal.watch(self._on_signal)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._beside is not None:
            return await self._beside.__aexit__(exc_type, exc, tb)
        assert self._signal is not None and self._cancel_scope is not None
        self._signal.unwatch(self._on_signal)
        return bool(self._cancel_scope.__exit__(exc_type, exc, tb))
