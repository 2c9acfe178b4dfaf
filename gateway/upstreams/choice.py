"""The routing rules as one pure function: :func:`rank` orders the upstreams for one request.

The router (gateway/upstreams/router.py) gathers a :class:`Candidate` per upstream that lists the
model (and may serve it: pins, reachable); :func:`rank` returns them best first, each with why it
was chosen. The first is tried first; the rest are where a failed attempt fails over to.

1. **warm**: the model is loaded there and a slot is free. Least busy first (slots taken and
   queued over the limit), ties by recent time to first byte, then config order.
2. **Loaded, but every such upstream is full**: queue where the expected wait for a slot is
   shortest (**queue**), unless that wait is longer than loading the model elsewhere takes (its
   measured load time) and an upstream with a free slot has it on disk: load it there
   (**spill**, a deliberate second instance).
3. **Loaded nowhere**: if a load is under way on one upstream, join it (**join**: one load per
   model across all upstreams); else load it on one upstream (**load**): the one with the fewest
   models loaded, then the least busy, then config order.

A model whose load time was never measured is never spilled: a second instance is only worth it
when the wait it saves is known to be longer than the load it costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["Candidate", "Choice", "Reason", "rank"]

Reason = Literal["warm", "queue", "spill", "join", "load"]


@dataclass(frozen=True)
class Candidate:
    """What one upstream is doing now, as far as the choice for one model goes."""

    name: str
    index: int  # config order, the last tie-break
    state: Literal["loaded", "loading", "not-loaded"]
    free: bool  # a concurrency slot is free now
    busy: float  # slots taken and queued over the limit
    wait_s: float  # expected wait for a slot (0 when free)
    load_s: float | None  # loading: the expected rest of the load; not-loaded: a whole load; None: unknown
    loaded_models: int = 0  # models loaded there now
    ttft_s: float | None = None  # recent time to first byte there

    def _fairness(self) -> tuple[float, float, int]:
        return (self.busy, self.ttft_s if self.ttft_s is not None else math.inf, self.index)


@dataclass(frozen=True)
class Choice:
    name: str
    reason: Reason


def rank(candidates: list[Candidate]) -> list[Choice]:
    """Every candidate, best first, each with the rule that placed it (see the module docstring)."""
    loaded = [c for c in candidates if c.state == "loaded"]
    loading = [c for c in candidates if c.state == "loading"]
    on_disk = [c for c in candidates if c.state == "not-loaded"]
    ranked: list[tuple[Candidate, Reason]] = []
    if loaded:
        warm = sorted((c for c in loaded if c.free), key=Candidate._fairness)
        ranked += [(c, "warm") for c in warm]
        full = sorted((c for c in loaded if not c.free), key=lambda c: (c.wait_s, *c._fairness()))
        if not warm and full:
            shortest = full[0].wait_s
            # A load elsewhere (one under way, or a new one where a slot is free) beats the queue
            # only when it is known to be shorter.
            elsewhere = [(c, _load_cost(c), "join") for c in loading] + [
                (c, _load_cost(c), "spill") for c in on_disk if c.free
            ]
            faster = sorted((e for e in elsewhere if e[1] < shortest), key=lambda e: (e[1], *e[0]._fairness()))
            ranked += [(c, reason) for c, _, reason in faster]  # type: ignore[misc]
        ranked += [(c, "queue") for c in full]
    else:
        ranked += [(c, "join") for c in sorted(loading, key=lambda c: (_load_cost(c), *c._fairness()))]
        ranked += [(c, "load") for c in sorted(on_disk, key=lambda c: (not c.free, c.loaded_models, *c._fairness()))]
    seen = {c.name for c, _ in ranked}
    # Whatever is left (a load under way or a disk copy that was not worth it): last resorts for failover.
    ranked += [(c, "join" if c.state == "loading" else "load") for c in candidates if c.name not in seen]
    return [Choice(c.name, reason) for c, reason in ranked]


def _load_cost(candidate: Candidate) -> float:
    """Seconds until a request placed there is served: the (rest of the) load, then the queue."""
    if candidate.load_s is None:
        return math.inf
    return candidate.load_s + candidate.wait_s
