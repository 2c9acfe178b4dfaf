"""Circuits shared with other gateway processes: what ``CircuitBreakerMiddleware`` asks of them.

Replicas of a gateway in front of one upstream should learn of its outage together: each one
counting its own failures sends the failing upstream N times the requests before all have opened,
and each one probing on its own sends N probes to an upstream that is recovering.
:class:`SharedCircuits` is the small interface the breaker needs from a store every replica sees
(gateway/state implements it on Redis): the state and failure window of each circuit, and a lease
that lets one replica at a time send the half-open probes. This package stays free of any such
store; the layer keeps its own circuits, following the shared ones, and decides with them alone
whenever the store answers None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["BreakerPolicy", "CircuitVerdict", "SharedCircuits"]


@dataclass(frozen=True)
class BreakerPolicy:
    """When a circuit opens and how it closes again (``CircuitBreakerMiddleware``'s options)."""

    failure_threshold: int = 5
    failure_ratio: float | None = None
    window_s: float = 60.0
    min_requests: int = 10
    reset_timeout_s: float = 30.0
    half_open_max_probes: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.min_requests < 1 or self.half_open_max_probes < 1:
            raise ValueError("failure_threshold, min_requests and half_open_max_probes must be >= 1")
        if self.failure_ratio is not None and not 0 < self.failure_ratio <= 1:
            raise ValueError(f"failure_ratio must be in (0, 1], got {self.failure_ratio!r}")
        if not self.window_s > 0 or not self.reset_timeout_s > 0:
            raise ValueError("window_s and reset_timeout_s must be above 0")


@dataclass(frozen=True)
class CircuitVerdict:
    """A circuit as every replica sees it, and what it means for one request.

    ``state``: closed, open or half_open. ``admitted``: the request may go to the upstream;
    ``probe``: as one of the half-open probes (this replica holds the probe lease). ``generation``
    changes with every transition: an outcome recorded against an older one is ignored.
    ``retry_after_s``: for a refused request, when to try again.
    """

    state: str
    admitted: bool
    probe: bool
    generation: int
    retry_after_s: float


class SharedCircuits(Protocol):
    """Circuit state and failure windows per key, counted across every replica."""

    @property
    def available(self) -> bool:
        """False while the store is known to be unreachable: decide locally without asking it."""
        ...

    async def admit(self, key: str, policy: BreakerPolicy) -> CircuitVerdict | None:
        """Whether a request may pass ``key``'s circuit now (moving an open one whose cool-down
        passed to half-open); None: the store cannot decide, use the local circuit."""
        ...

    async def record(
        self, key: str, verdict: CircuitVerdict, failed: bool | None, policy: BreakerPolicy
    ) -> CircuitVerdict | None:
        """Account for the request ``verdict`` admitted (``failed`` None: it says nothing about the
        upstream). Returns the circuit after it (``admitted`` is meaningless there); None: unknown.
        Bounded in time and never raises."""
        ...
