"""Several replicas' view of one Redis, for the shared-state tests: each its own ``SharedState``
(its own client, as separate processes have), built into a store by the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TypeVar

from gateway.state import SharedState

_Store = TypeVar("_Store")


@asynccontextmanager
async def replicas(
    url: str, store: Callable[[SharedState], _Store], count: int = 2, *, lease_s: float = 5.0, running: bool = True
) -> AsyncIterator[list[_Store]]:
    """``count`` replicas' ``store(state)`` on the Redis at ``url``; ``running``: with each state's
    background probe and heartbeats (else only its client, closed at the end)."""
    async with AsyncExitStack() as stack:
        stores = []
        for _ in range(count):
            state = SharedState(url, timeout_s=0.5, lease_s=lease_s, probe_interval_s=0.05)
            if running:
                await stack.enter_async_context(state.running())
            else:
                stack.push_async_callback(state.redis.aclose)
            stores.append(store(state))
        yield stores
