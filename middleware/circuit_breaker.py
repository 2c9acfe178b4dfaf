"""Stop sending requests to an upstream that keeps failing, and probe for its recovery.

One circuit per upstream, or per model with ``per_model=True`` (a model that crashes on load
should not take the others down with it). A circuit:

* **closed**: requests pass; it opens after ``failure_threshold`` consecutive failures, or, with
  ``failure_ratio`` set, when that share of at least ``min_requests`` outcomes in the last
  ``window_s`` failed;
* **open**: requests get 503 ``circuit_open`` with ``Retry-After`` (the cool-down left) and the
  upstream is not contacted, for ``reset_timeout_s``;
* **half-open**: up to ``half_open_max_probes`` requests at a time pass as probes; the rest are
  shed. A failed probe reopens the circuit; ``half_open_max_probes`` successful probes close it.

Failures: connect errors and resets, timeouts (a lmgate deadline cancelling the request included),
5xx responses, a stream cut mid-way. Count for nothing: a client that left, a cancellation that was
not a deadline (shutdown), and lmgate's own refusals. Any other answer (4xx, context overflow)
shows the upstream answering and counts as a success, as in Envoy's ``consecutive_5xx``.

The outcome of a stream is known only when it ends, and an ASGI app returns only then, so each
outcome is recorded when the inner app returns or raises. Outcomes of requests admitted before a
state change (a slow success arriving after the circuit opened) are ignored: they describe the
old state, and letting them through would close a circuit that just opened.

Why not aiobreaker (which the design card named): 1.2.0 counts a call as a success when it
returns, treats excluded exceptions (a client leaving) as successes that reset the failure count,
has no half-open gating (every request passes while the probe is in flight), no failure-ratio
window, and times the cool-down with ``datetime.utcnow()`` while ``opens_at`` compares against
local ``datetime.now()``, so ``Retry-After`` is off by the UTC offset (``None`` east of UTC) and
no clock can be injected for tests. What would remain of it is a three-value enum. The state
machine here is synchronous: every transition happens between two awaits, so it needs no lock.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from middleware._deadline import deadline_expired
from middleware.body import DEFAULT_LIMIT_BYTES, model_of, replaying_receive
from middleware.circuits import BreakerPolicy, CircuitVerdict, SharedCircuits
from middleware.errors import CircuitOpen, LmgateError, error_layer_outside, with_error_layer
from middleware.response import ResponseState
from middleware.types import ASGIApp, Clock, Message, Receive, Scope, Send

logger = logging.getLogger("lmgate.circuit_breaker")

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "BreakerPolicy", "CircuitBreakerMiddleware", "Outcome"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
StateChange = Callable[[str, str, str], None]

# Seconds a client shed while a probe is in flight is told to wait: the probe ends any moment.
_HALF_OPEN_RETRY_AFTER_S = 1.0


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"  # says nothing about the upstream: the client left, a shutdown


class _Window:
    """Outcomes over the last ``window_s``, in ten buckets, so memory stays flat at any traffic."""

    _BUCKETS = 10

    def __init__(self, window_s: float) -> None:
        self.width = window_s / self._BUCKETS
        self.buckets: deque[list[int]] = deque()  # [bucket index, outcomes, failures]

    def add(self, now: float, failed: bool) -> None:
        index = self._expire(now)
        if not self.buckets or self.buckets[-1][0] != index:
            self.buckets.append([index, 0, 0])
        self.buckets[-1][1] += 1
        self.buckets[-1][2] += failed

    def counts(self, now: float) -> tuple[int, int]:
        self._expire(now)
        return sum(b[1] for b in self.buckets), sum(b[2] for b in self.buckets)

    def clear(self) -> None:
        self.buckets.clear()

    def _expire(self, now: float) -> int:
        index = math.floor(now / self.width)
        while self.buckets and self.buckets[0][0] <= index - self._BUCKETS:
            self.buckets.popleft()
        return index


@dataclass(frozen=True, slots=True)
class Ticket:
    """Admission to one request: whether it is a probe, and the state generation it saw."""

    probe: bool
    generation: int


class Breaker:
    """One circuit's state machine; see the module docstring. Not tied to ASGI."""

    def __init__(self, key: str, policy: BreakerPolicy, *, clock: Clock, on_change: StateChange) -> None:
        self.key = key
        self.policy = policy
        self.clock = clock
        self.on_change = on_change
        self._state = CLOSED
        self.generation = 0
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.probes_in_flight = 0
        self.probe_successes = 0
        self.window = _Window(policy.window_s)

    @property
    def state(self) -> str:
        """The current state; an open circuit whose cool-down has passed becomes half-open here."""
        if self._state == OPEN and self.clock() >= self.opened_at + self.policy.reset_timeout_s:
            self._move(HALF_OPEN)
        return self._state

    @property
    def pristine(self) -> bool:
        """Indistinguishable from a new circuit (so it may be forgotten)."""
        return self.state == CLOSED and self.consecutive_failures == 0 and not self.window.buckets

    def follow(self, state: str, retry_after_s: float) -> None:
        """Take the state every replica shares (a transition here is logged and reported as usual);
        for an open circuit, ``retry_after_s`` is its cool-down left."""
        if state != self._state:
            self._move(state)
        if state == OPEN:
            self.opened_at = self.clock() + retry_after_s - self.policy.reset_timeout_s

    def admit(self) -> Ticket | None:
        """A ticket for a request that may go to the upstream, or None to shed it."""
        state = self.state
        if state == CLOSED:
            return Ticket(probe=False, generation=self.generation)
        if state == HALF_OPEN and self.probes_in_flight < self.policy.half_open_max_probes:
            self.probes_in_flight += 1
            return Ticket(probe=True, generation=self.generation)
        return None

    def probe_now(self) -> None:
        """An open circuit lets probes through at once, its cool-down cut short: something else
        (a router that saw the upstream answer again) says the upstream is back."""
        if self.state == OPEN:
            self._move(HALF_OPEN)

    def retry_after_s(self) -> float:
        if self._state == OPEN:
            return max(0.0, self.opened_at + self.policy.reset_timeout_s - self.clock())
        return _HALF_OPEN_RETRY_AFTER_S

    def record(self, ticket: Ticket, outcome: Outcome) -> None:
        """Account for a finished request. Outcomes from before a state change are ignored."""
        if ticket.generation != self.generation:
            return
        if ticket.probe:
            self.probes_in_flight -= 1
        if outcome is Outcome.NEUTRAL:
            return
        failed = outcome is Outcome.FAILURE
        if self._state == HALF_OPEN:
            if failed:
                self._move(OPEN)
            else:
                self.probe_successes += 1
                if self.probe_successes >= self.policy.half_open_max_probes:
                    self._move(CLOSED)
            return
        now = self.clock()
        self.window.add(now, failed)
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        if failed and (self.consecutive_failures >= self.policy.failure_threshold or self._ratio_exceeded(now)):
            self._move(OPEN)

    def _ratio_exceeded(self, now: float) -> bool:
        if self.policy.failure_ratio is None:
            return False
        total, failures = self.window.counts(now)
        return total >= self.policy.min_requests and failures >= self.policy.failure_ratio * total

    def _move(self, new: str) -> None:
        old, self._state = self._state, new
        self.generation += 1
        self.probes_in_flight = self.probe_successes = 0
        if new == OPEN:
            self.opened_at = self.clock()
        if new == CLOSED:
            self.consecutive_failures = 0
            self.window.clear()
        log = logger.warning if new == OPEN else logger.info
        log(
            "circuit %s: %s -> %s",
            self.key,
            old,
            new,
            extra={"event": "circuit_state", "circuit": self.key, "old_state": old, "new_state": new},
        )
        try:
            self.on_change(self.key, old, new)
        except Exception:  # an observer must not break the state machine or the request
            logger.exception("on_state_change failed for circuit %s", self.key, extra={"event": "circuit_observer_error"})


class CircuitBreakerMiddleware:
    """Shed requests while the upstream (or a model) keeps failing; see the module docstring.

    ``states()`` gives each circuit's state for health and metrics; ``on_state_change(key, old,
    new)`` is called on every transition. Circuits are keyed ``name`` (the whole upstream, and
    requests naming no model) or ``name:model``; at most ``max_keys`` are kept, healthy ones are
    forgotten first, and past that unknown models share the upstream's circuit.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        failure_threshold: int = 5,
        failure_ratio: float | None = None,
        window_s: float = 60.0,
        min_requests: int = 10,
        reset_timeout_s: float = 30.0,
        half_open_max_probes: int = 1,
        per_model: bool = False,
        clock: Clock = time.monotonic,
        on_state_change: StateChange | None = None,
        name: str = "upstream",
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        max_keys: int = 256,
        shared: SharedCircuits | None = None,
    ) -> None:
        self.app = app
        self.policy = BreakerPolicy(
            failure_threshold=failure_threshold,
            failure_ratio=failure_ratio,
            window_s=window_s,
            min_requests=min_requests,
            reset_timeout_s=reset_timeout_s,
            half_open_max_probes=half_open_max_probes,
        )
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.per_model = per_model
        self.clock = clock
        self.on_state_change = on_state_change or (lambda key, old, new: None)
        self.name = name
        self.body_limit_bytes = body_limit_bytes
        self.max_keys = max_keys
        self.rejected = 0
        self.shared = shared
        self._breakers: dict[str, Breaker] = {}
        self.breaker(name)

    def states(self) -> dict[str, str]:
        """Each circuit's state: "closed", "open" or "half_open".

        Reading it moves an open circuit whose cool-down has passed to half-open (logged and
        reported like any transition), so a health check never shows a stale "open".
        """
        return {key: breaker.state for key, breaker in self._breakers.items()}

    def state_of(self, model: str | None = None) -> str:
        """The state of the circuit a request for ``model`` would pass (without creating one)."""
        key = f"{self.name}:{model}" if self.per_model and model is not None else self.name
        breaker = self._breakers.get(key) or self._breakers[self.name]
        return breaker.state

    def probe_now(self) -> None:
        """Every open circuit lets probes through at once (see :meth:`Breaker.probe_now`)."""
        for breaker in self._breakers.values():
            breaker.probe_now()

    def breaker(self, key: str) -> Breaker:
        """The circuit for ``key``, created on first use."""
        breaker = self._breakers.get(key)
        if breaker is not None:
            return breaker
        if len(self._breakers) >= self.max_keys:
            for stale in [k for k, b in self._breakers.items() if k != self.name and b.pristine]:
                del self._breakers[stale]
            if len(self._breakers) >= self.max_keys:
                return self._breakers[self.name]
        breaker = self._breakers[key] = Breaker(key, self.policy, clock=self.clock, on_change=self.on_state_change)
        return breaker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not error_layer_outside(scope):  # used alone: layers inside raise to it, it renders
            await with_error_layer(self, scope, receive, send)
            return
        key = self.name
        if self.per_model:
            model = await model_of(scope, receive, limit_bytes=self.body_limit_bytes)
            receive = replaying_receive(scope, receive)
            if model is not None:
                key = f"{self.name}:{model}"
        breaker = self.breaker(key)
        verdict = await self._admit_shared(breaker)
        ticket = breaker.admit() if verdict is None else None
        if ticket is None and (verdict is None or not verdict.admitted):
            self.rejected += 1
            raise CircuitOpen(
                f"Circuit {breaker.key!r} is open after repeated upstream failures; lmgate is not sending it requests for now.",
                retry_after_s=breaker.retry_after_s() if verdict is None else verdict.retry_after_s,
            )

        response = ResponseState()

        async def observed_send(message: Message) -> None:
            response.observe(message)
            await send(message)

        outcome = Outcome.NEUTRAL
        try:
            await self.app(scope, receive, observed_send)
            outcome = judge_response(response)
        except LmgateError as error:
            outcome = judge_error(error)
            raise
        except anyio.get_cancelled_exc_class():
            outcome = Outcome.FAILURE if deadline_expired(scope) else Outcome.NEUTRAL
            raise
        except Exception:
            outcome = Outcome.FAILURE
            raise
        finally:
            if verdict is not None:
                await self._record_shared(breaker, verdict, outcome)
            elif ticket is not None:
                breaker.record(ticket, outcome)

    async def _admit_shared(self, breaker: Breaker) -> CircuitVerdict | None:
        """The shared circuit's verdict (followed by the local one); None: decide locally."""
        if self.shared is None or not self.shared.available:
            return None
        verdict = await self.shared.admit(breaker.key, self.policy)
        if verdict is not None:
            breaker.follow(verdict.state, verdict.retry_after_s)
        return verdict

    async def _record_shared(self, breaker: Breaker, verdict: CircuitVerdict, outcome: Outcome) -> None:
        assert self.shared is not None
        failed = None if outcome is Outcome.NEUTRAL else outcome is Outcome.FAILURE
        with anyio.CancelScope(shield=True):  # bounded by the store's own deadline
            after = await self.shared.record(breaker.key, verdict, failed, self.policy)
        if after is not None:
            breaker.follow(after.state, after.retry_after_s)


def judge_error(error: LmgateError) -> Outcome:
    """An ``LmgateError`` counts by its type: an upstream fault is a failure; a client's fault,
    a client that left and lmgate's own refusals (``Overload``) say nothing about the upstream."""
    return Outcome.FAILURE if error.upstream_fault else Outcome.NEUTRAL


def judge_response(response: ResponseState) -> Outcome:
    """A response counts by the upstream's own status: 5xx is a failure, any other answer a success.

    lmgate's own errors never arrive here as responses: inside this layer they are raised.
    """
    if not response.started:
        return Outcome.NEUTRAL
    return Outcome.FAILURE if response.status >= 500 else Outcome.SUCCESS
