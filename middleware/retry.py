"""Retry an attempt that failed before anything reached the client.

An attempt is retried when the inner app, before the client has received a byte:

* raises an ``LmgateError`` flagged ``retryable`` (the proxy's connect errors and resets,
  ``UpstreamUnavailable``; upstream read timeouts, ``UpstreamTimeout``), or
* starts a response with a status in ``retry_statuses`` (502/503/504), or a 429 that carries
  ``Retry-After``.

With ``scope["state"]["lmgate.failover"]`` set (``FAILOVER_KEY``) by an outer layer that moves a
failed attempt elsewhere, one attempt is made and its failure handed back at once.

Never retried: other statuses (400 bad request, context overflow, unknown model), lmgate's own
refusals (``circuit_open``, ``overloaded``, ``draining``: another attempt would be refused too or
add the load they exist to shed), a client that left, and anything once a byte has been forwarded.

A retryable response is held back, not forwarded (its body is an error of a few hundred bytes,
buffered up to 64 KiB). When the decision is "no more retries" (attempts spent, the retry budget
spent, the deadline too close, or a ``Retry-After`` longer than ``max_retry_after_s``) the held
response is forwarded as it came; so is the last attempt's response, untouched. The request body
(up to ``body_limit_bytes``) is read once and replayed to each attempt; a larger body gets one
attempt, also when an outer layer read it first with a larger limit of its own.

The attempt loop is plain code, one step after another: attempt, judge (:func:`_retryable`), compute
the wait, check the deadline, take a budget token, sleep. Only the backoff comes from a library:
tenacity's full jitter (``wait_random_exponential``) or AWS's decorrelated jitter as a tenacity wait
strategy, base ``backoff_base_s``, capped at ``backoff_max_s``. An upstream ``Retry-After`` replaces
the computed wait. Every wait and attempt must fit before the enclosing deadline
(``anyio.current_effective_deadline()``, which the timeout layer sets), and a client that
disconnects during a wait ends it at once.

A retry budget as in Envoy bounds the extra load: retries in progress may be at most
``budget_ratio`` of the requests in progress, but never fewer than ``budget_min_retries``.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC
from typing import Literal

import anyio
import tenacity

from middleware._budget import RetryBudget
from middleware.body import read_body, replaying_receive
from middleware.disconnect import cancel_on_disconnect
from middleware.errors import (
    ClientDisconnected,
    LmgateError,
    PayloadTooLarge,
    error_layer_outside,
    with_error_layer,
)
from middleware.request_id import request_id
from middleware.response import header_value
from middleware.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("lmgate.retry")

__all__ = [
    "ATTEMPTS_HEADER",
    "FAILOVER_KEY",
    "Attempt",
    "DecorrelatedJitter",
    "RetryBudget",
    "RetryMiddleware",
    "RetryStats",
    "attempt_number",
    "parse_retry_after",
    "retryable",
    "run_attempt",
]

ATTEMPTS_HEADER = b"x-lmgate-attempts"
_ATTEMPT_KEY = "lmgate.attempt"
#: Set truthy in ``scope["state"]`` by an outer layer that will send a failed attempt elsewhere (the
#: router, with another upstream left to try): this layer then makes one attempt and hands its
#: failure back at once, instead of retrying in place with backoff.
FAILOVER_KEY = "lmgate.failover"
# A held (retryable) response is an error document; past this size it is forwarded instead.
_HELD_LIMIT_BYTES = 64 * 1024

Sleep = Callable[[float], Awaitable[None]]


def attempt_number(scope: Scope) -> int:
    """The attempt the current request is on (1 for the first), for logs in inner layers."""
    return int((scope.get("state") or {}).get(_ATTEMPT_KEY, 1))


@dataclass
class RetryStats:
    """Counters since start-up, shared by every request through one middleware (read-only)."""

    requests: int = 0
    attempts: int = 0
    retries: int = 0
    budget_exhausted: int = 0


class DecorrelatedJitter(tenacity.wait.wait_base):
    """AWS's decorrelated jitter: each wait is uniform(base, 3 x the previous wait), capped.

    tenacity ships full jitter (``wait_random_exponential``) but not this one, so it is added as a
    tenacity wait strategy. It remembers the previous wait, so use one instance per request.
    """

    def __init__(self, *, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        self.previous = base

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        self.previous = min(self.cap, random.uniform(self.base, self.previous * 3))
        return self.previous


class _Backoff:
    """One request's waits from a tenacity wait strategy, asked by the number of the failed attempt.

    tenacity's strategies read the attempt number from a ``RetryCallState``; one is kept here for
    that alone (nothing else of tenacity's machinery runs).
    """

    def __init__(self, strategy: tenacity.wait.wait_base) -> None:
        self._strategy = strategy
        self._state = tenacity.RetryCallState(tenacity.AsyncRetrying(), None, (), {})

    def after(self, attempt: int) -> float:
        self._state.attempt_number = attempt
        return self._strategy(self._state)


class RetryMiddleware:
    """Retry attempts that failed before anything reached the client; see the module docstring.

    ``stats`` counts requests, attempts, retries and retries refused by the budget; ``budget``
    shows the retries in progress. ``sleep`` replaces ``anyio.sleep`` for the backoff (tests).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_retries: int = 3,
        backoff_base_s: float = 0.8,
        backoff_max_s: float = 20.0,
        jitter: Literal["full", "decorrelated"] = "full",
        retry_statuses: Iterable[int] = (502, 503, 504),
        max_retry_after_s: float = 30.0,
        body_limit_bytes: int = 1_048_576,
        budget_ratio: float = 0.2,
        budget_min_retries: int = 3,
        sleep: Sleep | None = None,
    ) -> None:
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not backoff_base_s > 0 or not backoff_max_s >= backoff_base_s:
            raise ValueError(f"need 0 < backoff_base_s <= backoff_max_s, got {backoff_base_s!r}, {backoff_max_s!r}")
        if jitter not in ("full", "decorrelated"):
            raise ValueError(f"jitter must be 'full' or 'decorrelated', got {jitter!r}")
        statuses = frozenset(retry_statuses)
        if not all(isinstance(status, int) and 400 <= status <= 599 for status in statuses):
            raise ValueError(f"retry_statuses must be HTTP error statuses, got {sorted(statuses)!r}")
        if not max_retry_after_s >= 0 or body_limit_bytes < 0:
            raise ValueError("max_retry_after_s and body_limit_bytes must be >= 0")
        if not 0 <= budget_ratio <= 1 or budget_min_retries < 0:
            raise ValueError(f"need 0 <= budget_ratio <= 1 and budget_min_retries >= 0, got {budget_ratio!r}")
        self.app = app
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.jitter = jitter
        self.retry_statuses = statuses
        self.max_retry_after_s = max_retry_after_s
        self.body_limit_bytes = body_limit_bytes
        self.sleep: Sleep = sleep or anyio.sleep
        self.budget = RetryBudget(ratio=budget_ratio, min_retries=budget_min_retries)
        self.stats = RetryStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not error_layer_outside(scope):  # used alone: layers inside raise to it, it renders
            await with_error_layer(self, scope, receive, send)
            return
        self.stats.requests += 1
        max_attempts = 1
        if self.max_retries and not (scope.get("state") or {}).get(FAILOVER_KEY):
            receive, replayable = await _buffer_body(scope, receive, self.body_limit_bytes)
            max_attempts = self.max_retries + 1 if replayable else 1
        exchange = _Exchange(self, scope, receive, send, max_attempts=max_attempts)
        self.budget.active_requests += 1
        try:
            last = await exchange.run()
            await last.deliver(send)
        except LmgateError as error:
            # Rendered further out; let the client see how many attempts it took.
            error.extra_headers = (
                *((k, v) for k, v in error.extra_headers if k.lower() != ATTEMPTS_HEADER.decode()),
                (ATTEMPTS_HEADER.decode(), str(exchange.number)),
            )
            raise
        finally:
            self.budget.active_requests -= 1

    def backoff(self) -> _Backoff:
        """The waits for one request."""
        if self.jitter == "decorrelated":
            return _Backoff(DecorrelatedJitter(base=self.backoff_base_s, cap=self.backoff_max_s))
        return _Backoff(tenacity.wait_random_exponential(multiplier=self.backoff_base_s, max=self.backoff_max_s))

    def _retryable(self, outcome: Message | LmgateError) -> tuple[bool, float | None]:
        """Whether an attempt's outcome is worth another attempt, and the upstream's Retry-After.

        ``outcome`` is the response start the inner app sent, or the error it raised before
        sending one. The one place that classifies outcomes: errors by their type
        (:func:`retryable`), responses by their status and Retry-After, never by lmgate's headers.
        """
        if isinstance(outcome, LmgateError):
            retry_after = outcome.retry_after_s
            retry = retryable(outcome) and (retry_after or 0) <= self.max_retry_after_s
            return retry, retry_after
        headers = outcome.get("headers", ())
        status = outcome["status"]
        retry_after = parse_retry_after(header_value(headers, b"retry-after"))
        if status not in self.retry_statuses and not (status == 429 and retry_after is not None):
            return False, None
        if retry_after is not None and retry_after > self.max_retry_after_s:
            return False, retry_after
        return True, retry_after


class Attempt:
    """What one attempt produced: forwarded to the client, or held back as retryable."""

    __slots__ = ("error", "forwarded", "held", "held_bytes", "number", "retry_after_s")

    def __init__(self, number: int) -> None:
        self.number = number
        self.forwarded = False
        self.held: list[Message] | None = None
        self.held_bytes = 0
        self.error: LmgateError | None = None
        self.retry_after_s: float | None = None

    @property
    def retryable(self) -> bool:
        return not self.forwarded and (self.held is not None or self.error is not None)

    def describe(self) -> str:
        if self.error is not None:
            return self.error.code
        if self.held:
            return f"status {self.held[0]['status']}"
        return "no response"

    async def deliver(self, send: Send) -> None:
        """Forward what was held back (the last attempt's answer), or raise its error."""
        if self.error is not None:
            raise self.error
        held, self.held = self.held or [], None
        self.forwarded = True
        for message in held:
            await send(message)


#: Judges an attempt's outcome (its response start, or the error it raised before one):
#: ``(worth another attempt, the upstream's Retry-After)``.
Judge = Callable[[Message | LmgateError], tuple[bool, float | None]]


async def run_attempt(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    number: int,
    judge: Judge | None,
    start: Callable[[Message], Message] = lambda start: start,
) -> Attempt:
    """Run ``app`` once; hold back an outcome ``judge`` finds worth another attempt.

    A response start judged retryable is held (with its body, up to 64 KiB, past which it is
    forwarded after all), and so is an ``LmgateError`` judged retryable; anything else goes to
    ``send`` or is raised. ``judge=None``: the final attempt, whose outcome is never held.
    ``start`` rewrites a response start before it is judged (headers lmgate adds). Shared by the
    retry layer and the router's failover between upstreams (gateway/upstreams/router.py).
    """
    attempt = Attempt(number)

    async def attempt_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = start(message)
            if judge is not None:
                retry, attempt.retry_after_s = judge(message)
                if retry:
                    attempt.held = [message]
                    return
            attempt.forwarded = True
            await send(message)
        elif attempt.held is not None:
            attempt.held.append(message)
            attempt.held_bytes += len(message.get("body", b""))
            if attempt.held_bytes > _HELD_LIMIT_BYTES:
                await attempt.deliver(send)
        else:
            await send(message)

    try:
        await app(scope, receive, attempt_send)
    except LmgateError as error:
        if judge is None or attempt.forwarded:
            raise
        retry, retry_after = judge(error)
        if not retry:
            raise
        attempt.held, attempt.error, attempt.retry_after_s = None, error, retry_after
    return attempt


class _Exchange:
    """One request's attempts, in a plain loop."""

    def __init__(self, middleware: RetryMiddleware, scope: Scope, receive: Receive, send: Send, *, max_attempts: int) -> None:
        self.mw = middleware
        self.scope = scope
        self.receive = receive
        self.send = send
        self.max_attempts = max_attempts
        self.number = 0
        self.holds_retry = False
        self.waits = middleware.backoff()

    async def run(self) -> Attempt:
        """Attempt until an answer is final; return the attempt whose answer goes to the client."""
        try:
            while True:
                attempt = await self._attempt()
                if not attempt.retryable or attempt.number >= self.max_attempts:
                    return attempt
                wait_s = attempt.retry_after_s if attempt.retry_after_s is not None else self.waits.after(attempt.number)
                if anyio.current_time() + wait_s >= anyio.current_effective_deadline():
                    # A retry that cannot start before the deadline would only turn a 503 into a 504.
                    self._log_stop(attempt, "the deadline is too close")
                    return attempt
                if not self.mw.budget.try_acquire():
                    self.mw.stats.budget_exhausted += 1
                    self._log_stop(attempt, "the retry budget is spent")
                    return attempt
                self.holds_retry = True  # until the retry's attempt ends
                self._log_retry(attempt, wait_s)
                await self._backoff(wait_s)
        finally:
            self._release()

    async def _attempt(self) -> Attempt:
        self.number += 1
        number = self.number
        final = number >= self.max_attempts
        self.mw.stats.attempts += 1
        if number > 1:
            self.mw.stats.retries += 1
        self.scope.setdefault("state", {})[_ATTEMPT_KEY] = number
        try:
            return await run_attempt(
                self.mw.app,
                self.scope,
                replaying_receive(self.scope, self.receive),
                self.send,
                number=number,
                judge=None if final else self.mw._retryable,
                start=lambda start: _with_attempts(start, number),
            )
        finally:
            self._release()

    def _release(self) -> None:
        if self.holds_retry:
            self.holds_retry = False
            self.mw.budget.release()

    async def _backoff(self, seconds: float) -> None:
        """Sleep before the next attempt, unless the client leaves first."""
        async with cancel_on_disconnect(replaying_receive(self.scope, self.receive), scope=self.scope) as watch:
            await self.mw.sleep(seconds)
        if watch.disconnected:
            raise ClientDisconnected("The client left while lmgate waited to retry.")

    def _log_retry(self, attempt: Attempt, wait_s: float) -> None:
        logger.warning(
            "attempt %d of %d failed (%s); retrying in %.2f s",
            attempt.number,
            self.max_attempts,
            attempt.describe(),
            wait_s,
            extra={
                "event": "retry",
                "request_id": request_id(self.scope),
                "attempt": attempt.number,
                "outcome": attempt.describe(),
                "backoff_s": round(wait_s, 3),
            },
        )

    def _log_stop(self, attempt: Attempt, reason: str) -> None:
        logger.warning(
            "attempt %d failed (%s); not retrying: %s",
            attempt.number,
            attempt.describe(),
            reason,
            extra={"event": "retry_stopped", "request_id": request_id(self.scope), "attempt": attempt.number, "reason": reason},
        )


def retryable(error: LmgateError) -> bool:
    """Whether another attempt may succeed, from the error's type alone (``retryable``: the
    upstream could not be reached or timed out). lmgate's own refusals (``Overload``), client
    faults and a client that left never are, whatever a response's headers say."""
    return error.retryable


def parse_retry_after(value: bytes | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date); None if absent or bad."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def _with_attempts(start: Message, number: int) -> Message:
    """A copy of ``start`` carrying ``X-Lmgate-Attempts`` (the inner app's message is not changed)."""
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != ATTEMPTS_HEADER]
    headers.append((ATTEMPTS_HEADER, str(number).encode("ascii")))
    return {**start, "headers": headers}


async def _buffer_body(scope: Scope, receive: Receive, limit_bytes: int) -> tuple[Receive, bool]:
    """Read the body so every attempt can be sent it: (receive to use, replayable).

    A body over ``limit_bytes`` is not kept for replay: whatever was read of it is handed on in
    front of the server's channel, and the request gets a single attempt.
    """
    consumed: list[Message] = []
    recording = True

    async def recording_receive() -> Message:
        message = await receive()
        if recording:
            consumed.append(message)
        return message

    try:
        await read_body(scope, recording_receive, limit_bytes=limit_bytes)
    except PayloadTooLarge:
        return _prepend(consumed, receive), False
    finally:
        recording = False
    return receive, True


def _prepend(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
