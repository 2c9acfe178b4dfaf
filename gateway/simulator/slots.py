"""Parallel slots of one loaded instance, with a strict FIFO queue beyond them.

LM Studio runs up to ``parallel`` predictions per instance ("Max Concurrent Predictions", default
4). Older builds queued the rest ("Model is currently generating. Queuing request.."); the
simulator queues them first come, first served. A freed slot is handed straight to the head of the
queue, so a newcomer can never overtake a waiter.
"""

from __future__ import annotations

from collections import deque

import anyio

from gateway.simulator.clock import Clock, wait_event_until


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class Slots:
    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_take(self) -> bool:
        if self.busy < self.size and not self._waiters:
            self.busy += 1
            return True
        return False

    async def take(self, clock: Clock, deadline: float | None) -> bool:
        """Queue for a slot until the simulated ``deadline``; False if it passed first.

        Cancellation (the client left, the model was unloaded) removes the waiter from the queue,
        or gives a slot granted in the meantime to the next one.
        """
        if self.try_take():
            return True
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await wait_event_until(clock, waiter.event, deadline)
        except BaseException:
            if waiter.granted:
                self.release()  # granted just as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise
        if not waiter.granted:
            self._waiters.remove(waiter)  # the deadline came first
        return waiter.granted

    def release(self) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.event.set()
        else:
            self.busy -= 1
