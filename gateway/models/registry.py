"""What lmgate knows about each model of its upstream: the upstream's word plus its own observations.

The upstream's listing (``gateway.models.upstream``) says whether a model is loaded; it cannot say
that one is *loading* (LM Studio has no such state), nor how long loads take. lmgate adds what it
saw itself: its own loads under way and their outcome, load durations (the ETA shown to clients),
load count, last use, and the requests in flight or waiting for a load.

State, in order of precedence: ``loading`` (lmgate is loading it), ``loaded`` / ``not-loaded`` (the
upstream's listing, corrected at once after lmgate's own loads), ``failed`` (lmgate's last load of
it failed and it is not loaded), ``unknown`` (the upstream does not say: a plain OpenAI-compatible
server, or a model it does not list).

The listing is re-read every ``refresh_s`` and on demand when a request finds it older than that.
Concurrent refreshes are merged into one. With ``shared`` (replicas sharing state on Redis), one
replica at a time reads it and the others take its copy (``gateway.models.shared.SharedListings``);
what lmgate saw itself (loads, durations, requests) stays local to each replica.

Records of models the upstream does not list are bounded: an admin can ask to load any name, and
each failed load leaves a record with its error. The newest ``UNLISTED_KEPT`` such records that
nothing uses stay (``/lmgate/models`` shows their errors), older ones are forgotten after a failed
load or a refresh. Models named in the configuration (``pinned``: preload, keep-warm) always stay.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio

from gateway.models.clock import Clock
from gateway.models.shared import ListingTurn, SharedListing, SharedListings
from gateway.models.upstream import Listed, ModelApiError, ModelFacts, UpstreamModels, UpstreamUnreachable

logger = logging.getLogger("lmgate.models")

State = Literal["unknown", "not-loaded", "loading", "loaded", "failed"]
#: Load durations remembered per model, for the median.
DURATIONS_KEPT = 20
#: Records of models the upstream does not list (heard of only through lmgate's own failed loads,
#: an admin load of any name) kept for ``/lmgate/models``; older ones are forgotten.
UNLISTED_KEPT = 16
#: A replica that finds another reading the shared listing keeps the older copy and asks again after this long.
SHARED_RETRY_S = 0.1
#: A replica with no shared copy at all polls for the one another replica is reading, with pauses
#: growing from the first to the last (bounded by ``refresh_s`` in all; then it reads the listing itself).
SHARED_WAIT_FIRST_S = 0.02
SHARED_WAIT_MAX_S = 0.2


@dataclass(eq=False)
class ModelRecord:
    """One model. Mutated only on the event loop, by the parts of the model service."""

    id: str
    listed: Listed | None = None
    loading_since: float | None = None  # anyio time lmgate's load was asked for
    load_error: str | None = None  # the upstream's message for lmgate's last failed load
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=DURATIONS_KEPT))
    load_count: int = 0
    last_used: float | None = None  # registry clock: the end of the last request or warm-up
    loaded_at: float | None = None  # registry clock: lmgate's own load of it ended (a listing older says too little)
    in_flight: int = 0  # requests through the cold-start layer now (waiting for a load included)
    waiting: int = 0  # requests waiting for a load now

    @property
    def state(self) -> State:
        if self.loading_since is not None:
            return "loading"
        loaded = self.listed.loaded if self.listed is not None else None
        if loaded:
            return "loaded"
        if self.load_error is not None:
            return "failed"
        return "unknown" if loaded is None else "not-loaded"

    @property
    def median_load_s(self) -> float | None:
        return statistics.median(self.durations) if self.durations else None


class ModelRegistry:
    """Every model lmgate has heard of on one upstream, and the freshness of that knowledge."""

    def __init__(
        self, upstream: UpstreamModels, *, clock: Clock, refresh_s: float, pinned: Collection[str] = ()
    ) -> None:
        self.upstream = upstream
        self.clock = clock
        self.refresh_s = refresh_s
        self.pinned = frozenset(pinned)  # configured models: their records are never forgotten
        self.records: dict[str, ModelRecord] = {}
        self.refreshed_at: float | None = None
        self.refresh_error: str | None = None
        self.refresh_unreachable = False  # the last refresh got no HTTP answer at all (readiness)
        self.fresh_until: float | None = None  # no refresh needed before then (registry clock)
        self.shared: SharedListings | None = None  # the listing shared with other replicas (Redis)
        self._refreshing: anyio.Event | None = None
        self._changed: anyio.Event | None = None

    # -- lookups --------------------------------------------------------------------------------

    def find(self, name: str) -> ModelRecord | None:
        """The record for a model key, or for the model that has ``name`` as a loaded instance id."""
        record = self.records.get(name)
        if record is not None:
            return record
        for candidate in self.records.values():
            if candidate.listed is not None and name in candidate.listed.instances:
                return candidate
        return None

    def record(self, model: str) -> ModelRecord:
        """The record for ``model``, created if lmgate has not heard of it (preload, keep-warm, admin)."""
        record = self.find(model)
        if record is None:
            record = self.records[model] = ModelRecord(model)
        return record

    def state(self, name: str) -> State:
        record = self.find(name)
        if record is None:
            return "unknown"
        if record.id != name and record.listed is not None and name in record.listed.instances:
            return "loaded"  # a loaded instance named directly ("key:2")
        return record.state

    def facts(self, name: str) -> ModelFacts | None:
        """What the last listing said about the model's file and loaded context (LM Studio only)."""
        record = self.find(name)
        return record.listed.facts if record is not None and record.listed is not None else None

    def expected_load_s(self, model: str) -> float | None:
        """How long a load of ``model`` should take: its median; else scaled by size from others."""
        record = self.find(model)
        if record is not None and record.durations:
            return record.median_load_s
        size = record.listed.size_bytes if record is not None and record.listed is not None else None
        rates = [
            load_s / r.listed.size_bytes
            for r in self.records.values()
            if (load_s := r.median_load_s) is not None and r.listed is not None and r.listed.size_bytes
        ]
        if size and rates:
            return size * statistics.median(rates)
        return None

    def remaining_load_s(self, model: str, elapsed_s: float) -> int | None:
        """Whole seconds a load running for ``elapsed_s`` should still take (0 once overdue); None: unknown."""
        expected = self.expected_load_s(model)
        if expected is None:
            return None
        return max(0, math.ceil(expected - elapsed_s))

    # -- refresh --------------------------------------------------------------------------------

    @property
    def fresh(self) -> bool:
        return self.fresh_until is not None and self.clock.now() < self.fresh_until

    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the listing if it is older than ``refresh_s`` (always with ``force``).

        Callers that arrive during a refresh wait for it instead of starting another. A failure
        keeps the previous knowledge and is reported in ``refresh_error``.

        With ``shared``, a refresh takes the other replicas' copy when it is younger than
        ``refresh_s``; else this replica reads the listing if it gets the lease, and publishes
        it. ``force`` (before a load, after an unload) always asks the upstream, and publishes
        what it heard. Without an answer from the store, the refresh is this replica's own.
        """
        if self._refreshing is not None:
            await self._refreshing.wait()
            if not force:
                return
        if not force and self.fresh:
            return
        done = self._refreshing = anyio.Event()
        try:
            turn = None
            if self.shared is not None and not force:
                turn = await self._from_shared(self.shared)
                if turn is not None and not turn.mine:
                    return  # the shared copy was taken
            await self._from_upstream(turn)
        finally:
            # Also when cancelled (the requester that refreshed left): the waiters try again.
            self._refreshing = None
            done.set()
            self.changed()

    async def _from_upstream(self, turn: ListingTurn | None) -> None:
        """Ask the upstream; then publish what it said, giving ``turn``'s lease back."""
        started = self.clock.now()
        listed: list[Listed] = []
        try:
            listed = await self.upstream.listing()
        except ModelApiError as exc:
            self._failed(str(exc), unreachable=isinstance(exc, UpstreamUnreachable))
        else:
            self._apply(listed, taken_at=started)
            self.refresh_error = None
            self.refresh_unreachable = False
        self.refreshed_at = self.clock.now()
        self.fresh_until = self.refreshed_at + self.refresh_s
        if self.shared is not None:
            listing = SharedListing(
                models=tuple(listed),
                api=self.upstream.api,
                error=self.refresh_error,
                unreachable=self.refresh_unreachable,
                took_s=self.refreshed_at - started,
            )
            await self.shared.publish(listing, turn=turn)

    async def _from_shared(self, shared: SharedListings) -> ListingTurn | None:
        """Take the shared copy (the turn returned is not ``mine``), or the turn to read the listing
        (``mine``: publish it with this turn); None: read it alone (no store, or no copy in time)."""
        deadline = anyio.current_time() + self.refresh_s  # a lease holder that died has lost it by then
        pause = SHARED_WAIT_FIRST_S
        while True:
            turn = await shared.turn(fresh_s=self.refresh_s)
            if turn is None or turn.mine:
                return turn
            if turn.copy is not None:
                self._take(turn.copy)
                return turn
            # Another replica is reading it and there is no copy yet (a start, an expired one): wait.
            if anyio.current_time() + pause > deadline:
                return None
            await anyio.sleep(pause)
            pause = min(pause * 2, SHARED_WAIT_MAX_S)

    def _take(self, copy: SharedListing) -> None:
        """Know what another replica's listing says, as if this replica had read it ``age_s`` ago."""
        now = self.clock.now()
        if copy.api is not None and self.upstream.api is None:
            self.upstream.api = copy.api  # loads go through the API that replica found (REST or not)
        if copy.error is None:
            self._apply(list(copy.models), taken_at=now - copy.age_s - copy.took_s)
            self.refresh_error = None
            self.refresh_unreachable = False
        else:
            self._failed(copy.error, unreachable=copy.unreachable)
        self.refreshed_at = now - copy.age_s
        # A copy past refresh_s is what another replica is replacing now: ask again shortly.
        fresh = copy.age_s < self.refresh_s
        self.fresh_until = self.refreshed_at + self.refresh_s if fresh else now + min(self.refresh_s, SHARED_RETRY_S)

    def _failed(self, error: str, *, unreachable: bool) -> None:
        if self.refresh_error != error:
            logger.warning("model state refresh failed: %s", error, extra={"event": "models_refresh_failed"})
        self.refresh_error = error
        self.refresh_unreachable = unreachable

    def _apply(self, listed: list[Listed], *, taken_at: float) -> None:
        """Take ``listed`` as the upstream's word, as of ``taken_at`` (registry clock)."""
        seen = set()
        for entry in listed:
            seen.add(entry.id)
            record = self.records.get(entry.id)
            if record is None:
                record = self.records[entry.id] = ModelRecord(entry.id)
            own = record.listed
            behind = record.loaded_at is not None and record.loaded_at > taken_at
            if entry.loaded is False and own is not None and own.loaded and behind:
                # lmgate's own load ended after this listing was read: the listing is behind.
                entry = replace(entry, loaded=True, instances=own.instances)
            record.listed = entry
            if entry.loaded:
                record.load_error = None
        for model, record in self.records.items():
            if model not in seen:
                record.listed = None
        self._forget_unlisted()

    def _forget_unlisted(self) -> None:
        """Forget the oldest records of models the upstream does not list, beyond ``UNLISTED_KEPT``."""
        unlisted = [model for model, record in self.records.items() if self._forgettable(record)]
        for model in unlisted[: max(0, len(unlisted) - UNLISTED_KEPT)]:
            del self.records[model]

    def _forgettable(self, record: ModelRecord) -> bool:
        return (
            record.listed is None
            and record.loading_since is None
            and not record.in_flight
            and not record.waiting
            and record.id not in self.pinned
        )

    # -- what lmgate saw ------------------------------------------------------------------------

    def load_started(self, model: str, at: float) -> None:
        self.record(model).loading_since = at
        self.changed()

    def load_finished(self, model: str, *, instance: str | None, seconds: float | None, error: str | None) -> None:
        """Record a load's outcome; a success marks the model loaded without waiting for a refresh.

        ``seconds`` is None when lmgate found the model loaded already: nothing to count.
        """
        record = self.record(model)
        record.loading_since = None
        record.load_error = error
        if error is not None and record.listed is None:
            # The newest failure last: the oldest unlisted records are the ones forgotten.
            self.records[record.id] = self.records.pop(record.id)
            self._forget_unlisted()
        if error is None:
            if seconds is not None:
                record.durations.append(seconds)
                record.load_count += 1
            record.last_used = record.loaded_at = self.clock.now()
            listed = record.listed or Listed(model, loaded=None)
            if listed.loaded is not None or self.upstream.api in ("api/v1", "api/v0"):
                instances = listed.instances if instance is None or instance in listed.instances else (*listed.instances, instance)
                record.listed = replace(listed, loaded=True, instances=instances)
        self.changed()

    def used(self, record: ModelRecord) -> None:
        record.last_used = self.clock.now()
        self.changed()

    # -- change notification (admin view, tests) ------------------------------------------------

    def changed(self) -> None:
        """Wake whoever waits in :meth:`wait_for`; call after mutating a record."""
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    async def wait_for(self, predicate: Callable[[ModelRegistry], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(self)`` holds (event-driven); ``TimeoutError`` after ``timeout`` s."""
        with anyio.fail_after(timeout):
            while not predicate(self):
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    # -- the admin view -------------------------------------------------------------------------

    def describe(self, record: ModelRecord, *, now: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        listed = record.listed
        loading = None
        if record.loading_since is not None:
            elapsed = now - record.loading_since
            loading = {"elapsed_s": round(elapsed, 1), "eta_s": self.remaining_load_s(record.id, elapsed)}
        median = record.median_load_s
        return {
            "id": record.id,
            "type": listed.type if listed else None,
            "state": record.state,
            "instances": list(listed.instances) if listed else [],
            "size_bytes": listed.size_bytes if listed else None,
            "loading": loading,
            "load_error": record.load_error,
            "loads": {
                "count": record.load_count,
                "last_s": round(record.durations[-1], 3) if record.durations else None,
                "median_s": round(median, 3) if median is not None else None,
            },
            "idle_s": round(self.clock.now() - record.last_used, 1) if record.last_used is not None else None,
            "in_flight": record.in_flight,
            "queued": record.waiting,
            **(extra or {}),
        }
