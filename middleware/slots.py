"""Concurrency slots shared with other gateway processes: what ``ConcurrencyMiddleware`` asks of them.

Several replicas of a gateway in front of one upstream must count their requests together, or
two replicas with ``limit=4`` send it eight. :class:`SharedSlots` is the small interface the
concurrency layer needs from a store that all replicas see (gateway/state implements it on
Redis); this package stays free of any such store. The layer keeps its own limiter for when the
store cannot decide: :class:`SlotsUnavailable` sends it back to local limits at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["SharedPressure", "SharedSlots", "SlotLease", "SlotsRefused", "SlotsUnavailable"]


class SlotsUnavailable(Exception):
    """The shared store cannot decide now (unreachable or too slow): decide locally instead."""


@dataclass(frozen=True)
class SharedPressure:
    """A key's slots across every replica, as last seen: ``in_flight`` held, ``queued`` waiting,
    and ``hold_s``, the average time a slot stays taken (None before any was released)."""

    in_flight: int
    queued: int
    hold_s: float | None


class SlotsRefused(Exception):
    """The shared queue for the key is full: the request is refused without waiting."""

    def __init__(self, pressure: SharedPressure) -> None:
        super().__init__(f"the shared queue is full ({pressure.queued} waiting)")
        self.pressure = pressure


class SlotLease(Protocol):
    """One slot held; released exactly once, when the request is over."""

    async def release(self, held_s: float) -> None:
        """Give the slot back (``held_s``: how long it was held, for everyone's Retry-After).
        Bounded in time and never raises: a slot that cannot be given back expires with its lease."""
        ...


class SharedSlots(Protocol):
    """Slots per key counted across every replica, with one FIFO queue per key."""

    @property
    def available(self) -> bool:
        """False while the store is known to be unreachable: use local limits without asking it."""
        ...

    async def acquire(self, key: str, *, limit: int, max_queue: int) -> SlotLease:
        """Hold one of ``limit`` slots of ``key``, waiting in the shared FIFO queue as long as it takes.

        Raises :class:`SlotsRefused` when ``max_queue`` requests already wait, and
        :class:`SlotsUnavailable` when the store fails meanwhile. The caller bounds the wait by
        cancelling; a cancelled acquire leaves the queue (and gives back a slot granted meanwhile).
        """
        ...

    def pressure(self, key: str) -> SharedPressure | None:
        """``key``'s slots as last seen (no request to the store); None: not seen yet."""
        ...
