"""Simulated time: every wait in the simulator (load delay, prefill, token pacing, TTL) goes through a clock.

Two clocks share one small interface:

* :class:`RealClock` follows ``time.monotonic()``, optionally sped up (``RealClock(speed=50)`` runs
  a 5 s load in 0.1 s of real time), for demos and real-time tests.
* :class:`FakeClock` stands still until a test calls ``advance(seconds)``; then every task whose
  deadline has passed wakes, in deadline order. A FakeClock test never sleeps.

Waits are expressed as absolute deadlines (``sleep_until``), computed from the moment a phase
started. That is what makes ``advance`` safe to call at any time: a generation paced at 50 tokens/s
whose first token is due at t=1.0 emits every token due before t=60 at once after
``advance(60)``, instead of waking for one token and then waiting 20 ms of fake time for the next.
The simulator also records each phase's start time in the same step as the counter a test waits
on (``loads_started``, ``generations_started``), so ``wait_for(...)`` followed by ``advance(...)``
cannot lose a race with the task that is about to sleep.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Protocol

import anyio
import anyio.lowlevel

#: ``created`` timestamps under a FakeClock start here (2023-11-14T22:13:20Z), so bodies are
#: byte-identical from run to run.
FAKE_EPOCH = 1_700_000_000.0


class Clock(Protocol):
    """What the simulator needs from time."""

    def now(self) -> float:
        """Simulated seconds on a monotonic scale (only differences matter)."""

    def wall(self) -> float:
        """Simulated Unix time, for ``created`` fields."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (at once, after a checkpoint, if it already is)."""


async def sleep(clock: Clock, seconds: float) -> None:
    """Wait ``seconds`` of simulated time from now."""
    await clock.sleep_until(clock.now() + seconds)


async def wait_event_until(clock: Clock, event: anyio.Event, deadline: float | None) -> bool:
    """Wait for ``event`` until the simulated ``deadline``; True if the event was set in time."""
    if deadline is None:
        await event.wait()
        return True
    async with anyio.create_task_group() as tg:

        async def expire() -> None:
            await clock.sleep_until(deadline)
            tg.cancel_scope.cancel()

        tg.start_soon(expire)
        await event.wait()
        tg.cancel_scope.cancel()
    return event.is_set()


class RealClock:
    """Real monotonic time, ``speed`` times faster (speed=1: real time)."""

    def __init__(self, speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.speed = speed
        self._origin = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._origin) * self.speed

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        # anyio.sleep may return a hair early on some platforms; loop until the deadline is real.
        while (remaining := deadline - self.now()) > 0:
            await anyio.sleep(remaining / self.speed)
        await anyio.lowlevel.checkpoint()


class FakeClock:
    """Time that moves only when the test says so (``advance``)."""

    def __init__(self, start: float = 0.0, *, wall_start: float = FAKE_EPOCH) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock (useful to assert something is pending)."""
        return len(self._sleepers)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        entry = (deadline, next(self._order), anyio.Event())
        heapq.heappush(self._sleepers, entry)
        try:
            await entry[2].wait()
        finally:
            if not entry[2].is_set():  # cancelled (client left, model unloaded): forget the sleeper
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake, in deadline order, every task whose deadline has come.

        Synchronous on purpose: a test calls it between awaits; the woken tasks run at the test's
        next await (``sim.wait_for`` or reading the response).
        """
        if seconds < 0:
            raise ValueError(f"time only moves forward; got advance({seconds!r})")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            heapq.heappop(self._sleepers)[2].set()
