"""RetryMiddleware: what is retried, what never is, backoff, Retry-After, the budget, the deadline.

Backoff is observed through an injected ``sleep`` that records each wait and returns at once, so
no test sleeps for real. Non-streaming responses go through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Sequence

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from middleware.body import read_body, replaying_receive
from middleware.circuit_breaker import CircuitBreakerMiddleware
from middleware.errors import (
    CircuitOpen,
    ClientDisconnected,
    ErrorMiddleware,
    Overload,
    Overloaded,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from middleware.retry import DecorrelatedJitter, RetryMiddleware, attempt_number, parse_retry_after
from middleware.timeout import TimeoutMiddleware
from middleware.types import ASGIApp, Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio

Step = int | tuple[int, list[tuple[bytes, bytes]]] | BaseException


class Upstream:
    """An inline ASGI app that plays ``steps`` in order (the last one repeats) and records bodies."""

    def __init__(self, *steps: Step, body: bytes = b"upstream says") -> None:
        self.steps = list(steps)
        self.body = body
        self.bodies: list[bytes] = []
        self.attempts: list[int] = []

    @property
    def calls(self) -> int:
        return len(self.bodies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = b""
        while True:
            message = await receive()
            received += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(received)
        self.attempts.append(attempt_number(scope))
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, BaseException):
            raise step
        status, headers = step if isinstance(step, tuple) else (step, [])
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain"), *headers]})
        await send({"type": "http.response.body", "body": self.body})


class Sleeps:
    """An injected sleep: records each backoff and returns without waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await anyio.lowlevel.checkpoint()


async def post(app: ASGIApp, body: bytes = b'{"model":"m"}') -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lmgate") as client:
        return await client.post("/v1/chat/completions", content=body)


def retrying(upstream: ASGIApp, sleeps: Sleeps, **options: object) -> RetryMiddleware:
    return RetryMiddleware(upstream, sleep=sleeps, **options)  # type: ignore[arg-type]


async def test_retry_succeeds_after_two_503s_in_a_starlette_app() -> None:
    statuses = [503, 503, 200]
    seen: list[dict[str, object]] = []

    async def completions(request: Request) -> JSONResponse:
        seen.append(await request.json())
        return JSONResponse({"status": "ok"}, status_code=statuses.pop(0))

    sleeps = Sleeps()
    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    middleware = retrying(app, sleeps, backoff_base_s=0.5, backoff_max_s=20.0)

    response = await post(middleware, b'{"model":"m","messages":[]}')

    assert response.status_code == 200
    assert response.headers["x-lmgate-attempts"] == "3"
    assert seen == [{"model": "m", "messages": []}] * 3  # the body was replayed to each attempt
    assert len(sleeps.waits) == 2
    # Full jitter: each wait is uniform in [0, base * 2 ** (retry - 1)].
    assert 0 <= sleeps.waits[0] <= 0.5 and 0 <= sleeps.waits[1] <= 1.0
    assert (middleware.stats.attempts, middleware.stats.retries) == (3, 2)
    assert middleware.budget.active_retries == 0 and middleware.budget.active_requests == 0


@pytest.mark.parametrize("error", [UpstreamUnavailable(), UpstreamTimeout()], ids=["connect", "upstream-timeout"])
async def test_retryable_errors_before_a_response_are_retried(error: Exception) -> None:
    upstream = Upstream(error, 200)
    response = await post(ErrorMiddleware(retrying(upstream, Sleeps())))
    assert response.status_code == 200
    assert upstream.attempts == [1, 2]
    assert upstream.bodies == [b'{"model":"m"}'] * 2


NEVER_RETRIED: list[tuple[str, Step, int]] = [
    ("bad-request", 400, 400),
    ("unknown-model", 404, 404),
    ("context-overflow", (400, [(b"x-lmgate-error", b"context_length_exceeded")]), 400),
    ("429-without-retry-after", 429, 429),
    ("circuit-open-from-a-layer-inside", CircuitOpen(retry_after_s=5), 503),
    ("overloaded-from-a-layer-inside", Overloaded(), 503),
    ("retry-after-over-cap", (503, [(b"retry-after", b"120")]), 503),
    ("circuit-open-raised", CircuitOpen(), 503),
]


@pytest.mark.parametrize(("step", "status"), [case[1:] for case in NEVER_RETRIED], ids=[case[0] for case in NEVER_RETRIED])
async def test_never_retried(step: Step, status: int) -> None:
    sleeps = Sleeps()
    upstream = Upstream(step, 200)
    response = await post(ErrorMiddleware(retrying(upstream, sleeps)))
    assert response.status_code == status
    assert upstream.calls == 1 and sleeps.waits == []
    assert response.headers["x-lmgate-attempts"] == "1"


class FlakyGpu(UpstreamUnavailable):
    """A package's own leaf of a retryable kind, with a code no layer knows."""

    code = "gpu_flaked"


class QuotaSpent(Overload):
    """A package's own refusal whose rendered header names a retryable code."""

    code = "quota_spent"


async def test_retry_decisions_come_from_types_not_header_strings() -> None:
    retried = Upstream(FlakyGpu(), 200)
    response = await post(ErrorMiddleware(retrying(retried, Sleeps())))
    assert response.status_code == 200 and retried.attempts == [1, 2]

    refusal = QuotaSpent(headers=[("X-Lmgate-Error", "upstream_unavailable")])
    refused = Upstream(refusal, 200)
    response = await post(ErrorMiddleware(retrying(refused, Sleeps())))
    assert response.status_code == 503 and refused.calls == 1
    assert "upstream_unavailable" in response.headers.get_list("x-lmgate-error")  # the header said retryable


async def test_a_503_response_is_judged_by_its_status_whatever_its_lmgate_header_says() -> None:
    # An upstream's answer (another lmgate in front of LM Studio, say) is the upstream's status.
    upstream = Upstream((503, [(b"x-lmgate-error", b"overloaded")]), 200)
    response = await post(retrying(upstream, Sleeps()))
    assert response.status_code == 200 and upstream.calls == 2


async def test_a_client_that_left_is_not_retried() -> None:
    upstream = Upstream(ClientDisconnected(), 200)
    with pytest.raises(ClientDisconnected):
        await RetryMiddleware(upstream, sleep=Sleeps())(http_scope(), body_then(disconnect_after=False), discard)
    assert upstream.calls == 1


async def test_nothing_is_retried_once_a_byte_reached_the_client() -> None:
    sent: list[Message] = []

    async def cut_after_start(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise UpstreamUnavailable()  # retryable by class, but the client already has bytes

    async def record(message: Message) -> None:
        sent.append(message)

    with pytest.raises(UpstreamUnavailable):
        await RetryMiddleware(cut_after_start, sleep=Sleeps())(http_scope(), body_then(disconnect_after=False), record)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_a_circuit_that_opens_between_attempts_ends_the_retries() -> None:
    upstream = Upstream(502)
    breaker = CircuitBreakerMiddleware(upstream, failure_threshold=2)
    response = await post(retrying(breaker, Sleeps(), max_retries=5))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "circuit_open"
    assert response.headers["x-lmgate-attempts"] == "3"
    assert upstream.calls == 2  # the third attempt was refused by the circuit, and not retried


async def test_retry_after_is_honoured_on_429_and_503() -> None:
    sleeps = Sleeps()
    upstream = Upstream((429, [(b"retry-after", b"2")]), (503, [(b"retry-after", b"7")]), 200)
    response = await post(retrying(upstream, sleeps, max_retry_after_s=30.0))
    assert response.status_code == 200
    assert sleeps.waits == [2.0, 7.0]


async def test_the_last_attempt_is_forwarded_untouched() -> None:
    sleeps = Sleeps()
    upstream = Upstream((503, [(b"x-upstream", b"lmstudio")]), body=b'{"error":"busy"}')
    response = await post(retrying(upstream, sleeps, max_retries=3))
    assert response.status_code == 503
    assert response.content == b'{"error":"busy"}'
    assert response.headers["x-upstream"] == "lmstudio"
    assert response.headers["x-lmgate-attempts"] == "4"
    assert upstream.attempts == [1, 2, 3, 4] and len(sleeps.waits) == 3


async def test_a_failing_connect_reports_every_attempt_in_the_error() -> None:
    upstream = Upstream(UpstreamUnavailable())
    response = await post(ErrorMiddleware(retrying(upstream, Sleeps(), max_retries=2)))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert response.headers["x-lmgate-attempts"] == "3"


async def test_budget_holds_under_a_failing_upstream() -> None:
    """20 requests at once against an upstream that always fails: retries stay within 20% of them."""
    requests, retries_in_flight = 20, []
    all_arrived = anyio.Event()
    first_attempts = 0

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal first_attempts
        await receive()
        if attempt_number(scope) == 1:
            first_attempts += 1
            if first_attempts == requests:
                all_arrived.set()
            await all_arrived.wait()  # every request is in flight before any may decide to retry
        else:
            retries_in_flight.append(middleware.budget.active_retries)
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"down"})

    middleware = RetryMiddleware(failing, sleep=Sleeps(), max_retries=3, budget_ratio=0.2, budget_min_retries=3)
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await post(middleware)).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(requests):
            tg.start_soon(one)

    assert statuses == [503] * requests
    allowed = max(3, int(0.2 * requests))  # 4 retries in flight at most
    assert max(retries_in_flight) <= allowed
    assert middleware.stats.budget_exhausted >= requests - allowed
    # Without the budget: 20 x 4 = 80 attempts. With it: the 20 first attempts + 4 x 3 retries.
    assert middleware.stats.attempts <= requests + allowed * 3
    assert middleware.budget.active_retries == 0 and middleware.budget.active_requests == 0


async def test_a_body_over_the_replay_limit_gets_one_attempt() -> None:
    upstream = Upstream(503, 200)
    body = b"x" * 100
    response = await post(retrying(upstream, Sleeps(), body_limit_bytes=10), body)
    assert response.status_code == 503
    assert upstream.bodies == [body]  # the inner app still got the whole body, once


async def test_a_body_an_outer_layer_read_is_still_held_to_the_replay_limit() -> None:
    """Inside the gateway an outer layer (validation, telemetry) reads the body first, with its own limit."""
    upstream = Upstream(503, 200)
    body = b"x" * 100
    retry = retrying(upstream, Sleeps(), body_limit_bytes=10)

    async def reads_first(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(scope, receive, limit_bytes=1024)
        await retry(scope, replaying_receive(scope, receive), send)

    response = await post(reads_first, body)
    assert response.status_code == 503
    assert upstream.bodies == [body]


async def test_a_chunked_body_over_the_limit_is_handed_on_whole() -> None:
    upstream = Upstream(503, 200)
    chunks = [b"a" * 8, b"b" * 8, b"c" * 8]
    messages = iter([{"type": "http.request", "body": c, "more_body": i < 2} for i, c in enumerate(chunks)])

    async def receive() -> Message:
        return next(messages)

    await RetryMiddleware(upstream, sleep=Sleeps(), body_limit_bytes=10)(http_scope(), receive, discard)
    assert upstream.bodies == [b"".join(chunks)]


async def test_the_deadline_bounds_the_retries() -> None:
    """A Retry-After that outlasts the timeout's deadline: forward the 503 now, not a 504 later."""
    sleeps = Sleeps()
    upstream = Upstream((503, [(b"retry-after", b"5")]), 200)
    app = TimeoutMiddleware(retrying(upstream, sleeps), first_token_s=2.0)
    response = await post(app)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert upstream.calls == 1 and sleeps.waits == []


async def test_a_client_that_disconnects_during_backoff_ends_the_wait() -> None:
    upstream = Upstream(503, 200)

    async def forever(seconds: float) -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(5), pytest.raises(ClientDisconnected):
        await RetryMiddleware(upstream, sleep=forever)(http_scope(), body_then(disconnect_after=True), discard)
    assert upstream.calls == 1


def test_decorrelated_jitter_grows_from_the_base_and_respects_the_cap() -> None:
    wait = DecorrelatedJitter(base=0.8, cap=5.0)
    previous = 0.8
    for _ in range(50):
        value = wait(None)  # type: ignore[arg-type]
        assert 0.8 <= value <= min(5.0, previous * 3)
        previous = value


async def test_decorrelated_jitter_is_used_when_chosen() -> None:
    sleeps = Sleeps()
    upstream = Upstream(503)
    await post(retrying(upstream, sleeps, jitter="decorrelated", backoff_base_s=1.0, backoff_max_s=4.0))
    assert len(sleeps.waits) == 3
    assert all(1.0 <= w <= 4.0 for w in sleeps.waits)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"3", 3.0), (b" 1.5 ", 1.5), (b"-4", 0.0), (b"soon", None), (None, None), (b"nan", None)],
)
def test_parse_retry_after(value: bytes | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_reads_http_dates() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True).encode()
    seconds = parse_retry_after(when)
    assert seconds is not None and 28 <= seconds <= 31


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": -1},
        {"backoff_base_s": 0},
        {"backoff_base_s": 5, "backoff_max_s": 1},
        {"jitter": "none"},
        {"retry_statuses": (200,)},
        {"budget_ratio": 1.5},
    ],
)
def test_invalid_options_fail_at_construction(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryMiddleware(Upstream(200), **options)  # type: ignore[arg-type]


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    await RetryMiddleware(app)({"type": "lifespan"}, body_then(disconnect_after=False), discard)
    assert seen == ["lifespan"]


# --- helpers --------------------------------------------------------------------------------------

def http_scope() -> Scope:
    """A fresh scope per call: layers cache the body in ``scope["state"]``."""
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


def body_then(*, disconnect_after: bool, body: bytes = b"{}") -> Receive:
    """A client's channel: the body, then a disconnect at once, or silence."""
    messages: Sequence[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if disconnect_after:
            return {"type": "http.disconnect"}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


async def discard(message: Message) -> None:
    pass
