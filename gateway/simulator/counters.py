"""What the simulator saw, for tests to assert on: loads, evictions, cancels, queue depth.

Every assignment to a counter wakes the tasks blocked in :meth:`Counters.wait_for`, so a test waits
for an event ("the simulator noticed the cancel") instead of sleeping and hoping. List counters
(``tokens_before_cancel``, ``cancel_times``) are appended *before* the integer they belong to is
incremented, so a predicate on the integer always sees the lists complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import anyio


@dataclass(eq=False)
class Counters:
    requests: int = 0  # inference requests: chat, completions, responses, messages, embeddings (any outcome)
    http_requests: int = 0  # every HTTP request to LM Studio's port except the control API
    routes: dict[str, int] = field(default_factory=dict)  # "METHOD /path" -> HTTP requests
    loads_started: int = 0
    loads_completed: int = 0
    loads_failed: int = 0  # load_failure fault, or the load was aborted while others waited
    loads_aborted: int = 0  # the last waiting client left and abort_load_on_disconnect is on
    loading: int = 0  # loads under way now
    unloads: int = 0  # out-of-band or /api/v1/models/unload
    evictions: int = 0  # JIT models unloaded by Auto-Evict
    ttl_unloads: int = 0
    generations_started: int = 0  # took a slot (prefill begins)
    generations_completed: int = 0  # ran to the end, whether or not the client was still there
    generations_cancelled: int = 0  # stopped because a streaming client left
    generations_killed: int = 0  # stopped because their model was unloaded (evict, unload, fault)
    generations_failed: int = 0  # ended by an injected error (crash, error frame, overflow)
    tokens_before_cancel: list[int] = field(default_factory=list)
    cancel_times: list[float] = field(default_factory=list)  # time.monotonic() when the cancel was noticed
    active_generations: int = 0
    max_active_generations: int = 0
    queued: int = 0  # requests waiting for a parallel slot now
    rejected: int = 0  # 503 answers: queue full or queue timeout
    disconnects: int = 0  # clients that left before their response was complete
    disconnect_times: list[float] = field(default_factory=list)  # time.monotonic() when each was noticed
    faults_applied: int = 0
    instances: dict[str, int] = field(default_factory=dict)  # model key -> loaded instances

    def __post_init__(self) -> None:
        object.__setattr__(self, "_changed", None)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        changed: anyio.Event | None = self.__dict__.get("_changed")
        if changed is not None:
            object.__setattr__(self, "_changed", None)
            changed.set()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy (the control API's ``GET /__sim/counters``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.copy() if isinstance(value, list | dict) else value
        return out

    async def wait_for(self, predicate: Callable[[Counters], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(self)`` holds; ``TimeoutError`` after ``timeout`` real seconds."""
        with anyio.fail_after(timeout):
            while not predicate(self):
                changed = self.__dict__["_changed"]
                if changed is None:
                    changed = anyio.Event()
                    object.__setattr__(self, "_changed", changed)
                await changed.wait()
