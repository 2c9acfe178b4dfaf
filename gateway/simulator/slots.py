"""Parallel slots of one loaded instance, with a strict FIFO queue beyond them.

LM Studio runs up to ``parallel`` predictions per instance ("Max Concurrent Predictions", default
4). Older builds queued the rest ("Model is currently generating. Queuing request.."); the
simulator queues them first come, first served. A freed slot is handed straight to the head of the
queue, so a newcomer can never overtake a waiter, together with the simulated time at which it was
freed: the waiter's generation starts then, not whenever its task happens to run after a FakeClock
jump (see clock.py).
"""

from __future__ import annotations

from collections import deque

import anyio

from gateway.simulator.clock import Clock, wait_event_until


class _Waiter:
    __slots__ = ("event", "granted", "granted_at")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False
        self.granted_at = 0.0


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

    async def take(self, clock: Clock, at: float, deadline: float | None) -> float | None:
        """Queue (from simulated time ``at``) for a slot until the simulated ``deadline``.

        Returns the simulated time the slot became this request's, or None if the deadline came first.

        Cancellation (the client left, the model was unloaded) removes the waiter from the queue,
        or gives a slot granted in the meantime to the next one.
        """
        if self.try_take():
            return at
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await wait_event_until(clock, waiter.event, deadline)
        except BaseException:
            if waiter.granted:
                self.release(waiter.granted_at)  # granted just as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise
        if not waiter.granted:
            self._waiters.remove(waiter)  # the deadline came first
            return None
        return max(at, waiter.granted_at)

    def release(self, at: float) -> None:
        """Free a slot at simulated time ``at``, handing it to the longest waiter if any."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted, waiter.granted_at = True, at
            waiter.event.set()
        else:
            self.busy -= 1
