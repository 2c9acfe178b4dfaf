"""State shared by several lmgate replicas through Redis (docs/shared-state.md).

Without ``state.redis_url`` nothing here is built and every decision stays in memory, as for a
single lmgate. With it:

* :class:`SharedState` (``store.py``): the one Redis client of a gateway, every call bounded by
  ``state.timeout_ms``, the ``available`` flag with its background probe, heartbeats for lease
  renewals, logs and metrics of the transitions;
* :class:`RedisSlots` (``slots.py``): concurrency slots counted across replicas, with leases and
  a FIFO queue; ``ConcurrencyMiddleware`` uses it through ``middleware.slots.SharedSlots``.
"""

from gateway.state.slots import RedisSlots
from gateway.state.store import SharedScript, SharedState, StateUnavailable

__all__ = ["RedisSlots", "SharedScript", "SharedState", "StateUnavailable"]
