"""``GatewayView``: what lmgate's own routes may read of the gateway, as plain data.

The admin routes and the status page answer from this narrow, read-only interface instead of
reaching into the gateway's parts (the model service's warmer, the breaker layer, the drain
state...). The gateway implements it (``gateway.stack.GatewaySnapshot``); this module imports
nothing from the rest of the gateway, so ``admin`` cannot form an import cycle with what it
describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ReadinessFacts:
    """What ``/readyz`` decides from, all known without asking the upstream."""

    #: The ``models.preload`` models not loaded yet; empty once every one has been loaded once.
    preload_pending: tuple[str, ...]
    draining: bool
    #: False while a telemetry-side preload is under way.
    preloaded: bool
    #: The whole-upstream circuit's state (None: no circuit breaker).
    circuit: str | None
    #: Why the latest model refresh could not reach the upstream, while that is current.
    unreachable: str | None
    #: Redis shared by the replicas: "available", "unavailable" (deciding locally: degraded, still
    #: ready), or None when not configured.
    shared_state: str | None = None


@dataclass(frozen=True)
class DrainFacts:
    draining: bool
    in_flight: int


class GatewayView(Protocol):
    """Read-only: each method returns plain data (dicts, lists, numbers, strings) or a frozen record."""

    def readiness(self) -> ReadinessFacts: ...

    async def models(self) -> dict[str, Any]:
        """The ``GET /lmgate/models`` document, the listing refreshed first when it is stale."""
        ...

    def expected_load_s(self, model: str) -> float | None:
        """How long a load of ``model`` is expected to take (None: nothing to go on)."""
        ...

    def drain(self) -> DrainFacts: ...

    def concurrency(self) -> dict[str, Any]:
        """Slots in use, queued and the limit, per key (empty without the concurrency layer)."""
        ...

    def breakers(self) -> dict[str, str]:
        """Each circuit's state (empty without the circuit breaker)."""
        ...

    def upstreams(self) -> list[dict[str, Any]]:
        """One card per upstream: name, url, reachable, circuit, slots, models loaded and loading."""
        ...

    def latency(self) -> dict[str, Any]:
        """Rolling latency and time-to-first-token percentiles, per model."""
        ...

    def cache(self) -> dict[str, Any] | None:
        """The response cache's size and lookups (None: the cache is off); with Redis, ``shared``:
        the answers every replica shares, as last counted (the other numbers are this process's)."""
        ...

    def shared_state(self) -> dict[str, Any] | None:
        """Whether Redis answers (``available``), for how long (``for_s``), its ``last_error``;
        None: no ``state.redis_url``, this process decides alone."""
        ...

    def metrics(self, accept: str | None) -> tuple[bytes, str] | None:
        """The Prometheus exposition for ``accept`` and its content type (None: metrics are off)."""
        ...

    async def llm_health(self) -> tuple[int, dict[str, Any]]:
        """The ``/lmgate/health/llm`` status and document."""
        ...
