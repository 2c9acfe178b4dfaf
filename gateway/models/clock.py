"""The clock the model service schedules by: refreshes, keep-warm pings, idle times.

Keep-warm works on the scale of LM Studio's idle TTL (an hour by default), so its tests run on a
clock they move by hand: the simulator's ``FakeClock`` has exactly this shape and can be passed in.
Short waits that must be real (a load's timeout, heartbeats) use anyio's clock instead.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences matter)."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline``."""


class MonotonicClock:
    """Real time (``time.monotonic``)."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - time.monotonic()))
