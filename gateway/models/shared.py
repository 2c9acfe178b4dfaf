"""Model loads shared with other replicas: what the :class:`~gateway.models.loader.Loader` asks of them.

Two replicas that each get a cold request for the same model must not both load it: LM Studio
would keep two instances, the very failure lmgate exists to prevent. :class:`SharedLoads` is the
small interface the loader needs from a store every replica sees (``gateway.state.loads``
implements it on Redis): claim a model's load (only one replica wins it; the others follow it),
publish the outcome, and say which loads run on other replicas (for ``/lmgate/models``).

A store that cannot decide answers None: the loader then loads as a lone lmgate does (its own
single flight, after re-reading the upstream's listing). Nothing here raises for a store failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["Claim", "SharedLoad", "SharedLoads"]

LoadState = Literal["loading", "loaded", "failed"]


@dataclass(frozen=True)
class SharedLoad:
    """One load as every replica sees it."""

    model: str
    state: LoadState
    token: str  # this load's identity: a later load of the same model has another
    owner: str  # the replica running it
    elapsed_s: float  # since it was claimed (the store's clock)
    expected_s: float | None = None  # how long its owner expected it to take
    error: str | None = None  # failed: the upstream's message
    instance: str | None = None  # loaded: the instance id the upstream reported
    seconds: float | None = None  # loaded: how long it took


@dataclass(frozen=True)
class Claim:
    """The answer to :meth:`SharedLoads.claim`.

    ``mine``: this replica runs the load and publishes its outcome with :meth:`SharedLoads.finish`.
    Otherwise ``load`` is another replica's: still ``loading`` (ask again later, following its
    token), or the outcome (``loaded`` / ``failed``) of the load that was followed.
    """

    mine: bool
    load: SharedLoad


class SharedLoads(Protocol):
    """Single-flight loads across replicas, with leases (a replica that dies loses its claim)."""

    async def claim(self, model: str, *, expected_s: float | None, following: str | None = None) -> Claim | None:
        """Claim ``model``'s load unless another replica's is under way; None: the store cannot decide.

        ``following``: the token of the load this replica waits for; its outcome is returned once
        known. A followed load whose owner died (its lease ran out) is claimed instead.
        """
        ...

    async def finish(self, claim: Claim, *, error: str | None, instance: str | None, seconds: float | None) -> None:
        """Publish the outcome of a load this replica claimed, for the replicas following it.
        Bounded in time and never raises: an outcome that cannot be published expires with the lease."""
        ...

    def elsewhere(self) -> Mapping[str, SharedLoad]:
        """Loads under way on other replicas, by model, as last seen (no request to the store)."""
        ...
