"""Model state shared with other replicas: loads (for the :class:`~gateway.models.loader.Loader`) and
listings (for the :class:`~gateway.models.registry.ModelRegistry`).

Two replicas that each get a cold request for the same model must not both load it: LM Studio
would keep two instances, the very failure lmgate exists to prevent. :class:`SharedLoads` is the
small interface the loader needs from a store every replica sees (``gateway.state.loads``
implements it on Redis): claim a model's load (only one replica wins it; the others follow it),
publish the outcome, and say which loads run on other replicas (for ``/lmgate/models``).

A store that cannot decide answers None: the loader then loads as a lone lmgate does (its own
single flight, after re-reading the upstream's listing). Nothing here raises for a store failure.

Listings: one replica at a time reads an upstream's listing and publishes it; the others read that
copy instead of asking the upstream (:class:`SharedListings`). A store that cannot answer makes
each replica read the listing itself, as a lone lmgate does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.models.upstream import Api, Listed

__all__ = ["Claim", "ListingTurn", "SharedListing", "SharedListings", "SharedLoad", "SharedLoads"]

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


@dataclass(frozen=True)
class SharedListing:
    """One upstream's listing as a replica read it, for the others (``models`` is empty after an error)."""

    models: tuple[Listed, ...]
    api: Api | None  # the listing API that answered (the loader uses it: REST loads or not)
    error: str | None = None  # the refresh failed: the models are not known
    unreachable: bool = False  # the upstream gave no HTTP answer at all (readiness)
    took_s: float = 0.0  # how long the upstream took to answer
    age_s: float = 0.0  # read back: since it was published (the store's clock)


@dataclass(frozen=True)
class ListingTurn:
    """The answer to :meth:`SharedListings.turn`.

    ``copy``: the shared copy, if one is kept (younger than ``fresh_s``, or older but still allowed).
    ``mine``: this replica holds the lease: it reads the listing now and publishes it with this turn.
    Neither: another replica is reading it, and no copy is kept yet.
    """

    copy: SharedListing | None
    mine: bool = False
    token: str | None = None


class SharedListings(Protocol):
    """One upstream's listing read by one replica at a time (a short lease) and kept for all."""

    async def turn(self, *, fresh_s: float) -> ListingTurn | None:
        """The shared copy if it is younger than ``fresh_s``; else the lease to refresh it, unless
        another replica holds it. None: the store cannot say (read the listing alone)."""
        ...

    async def publish(self, listing: SharedListing, *, turn: ListingTurn | None) -> None:
        """Keep ``listing`` for the other replicas and give back ``turn``'s lease (if it is one).
        Bounded in time and never raises: a copy that cannot be written is read again by the others."""
        ...
