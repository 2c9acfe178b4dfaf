"""CircuitBreakerMiddleware: open, shed, half-open probes, close; what counts as a failure, and when.

Time is an injected clock the tests move by hand; requests that must overlap (a probe in flight)
block on anyio Events.
"""

from __future__ import annotations

import contextlib

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from middleware.circuit_breaker import Breaker, BreakerPolicy, CircuitBreakerMiddleware, Outcome
from middleware.errors import (
    ClientDisconnected,
    ErrorMiddleware,
    GatewayTimeout,
    Overload,
    Overloaded,
    StreamCut,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from middleware.timeout import TimeoutMiddleware
from middleware.types import ASGIApp, Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def post(app: ASGIApp, body: bytes = b'{"model":"m"}') -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lmgate") as client:
        return await client.post("/v1/chat/completions", content=body)


class Flaky:
    """A Starlette app whose status the test sets; ``hold`` parks requests until released."""

    def __init__(self) -> None:
        self.status = 503
        self.calls = 0
        self.hold: anyio.Event | None = None
        self.entered = anyio.Event()
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])

    async def completions(self, request: Request) -> JSONResponse:
        self.calls += 1
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        return JSONResponse({"status": self.status}, status_code=self.status)


async def test_a_breaker_opens_sheds_half_opens_and_closes() -> None:
    clock, changes, upstream = Clock(), [], Flaky()
    breaker = CircuitBreakerMiddleware(
        upstream.app, failure_threshold=3, reset_timeout_s=30, clock=clock, on_state_change=lambda *c: changes.append(c)
    )

    for _ in range(3):
        assert (await post(breaker)).status_code == 503
    assert breaker.states() == {"upstream": "open"}

    shed = await post(breaker)
    assert shed.status_code == 503 and upstream.calls == 3  # no upstream contact while open
    assert shed.json()["error"]["code"] == "circuit_open"
    assert shed.headers["retry-after"] == "30"
    clock.advance(10)
    assert (await post(breaker)).headers["retry-after"] == "20"

    clock.advance(20)  # cool-down over: the next request is the probe; others wait for its verdict
    upstream.status, upstream.hold, upstream.entered = 200, anyio.Event(), anyio.Event()
    probe: list[httpx.Response] = []
    async with anyio.create_task_group() as tg:

        async def send_probe() -> None:
            probe.append(await post(breaker))

        tg.start_soon(send_probe)
        await upstream.entered.wait()
        assert breaker.states() == {"upstream": "half_open"}
        during = await post(breaker)
        assert during.status_code == 503 and during.json()["error"]["code"] == "circuit_open"
        assert during.headers["retry-after"] == "1"
        upstream.hold.set()

    assert probe[0].status_code == 200
    assert breaker.states() == {"upstream": "closed"}
    assert changes == [
        ("upstream", "closed", "open"),
        ("upstream", "open", "half_open"),
        ("upstream", "half_open", "closed"),
    ]
    assert upstream.calls == 4 and breaker.rejected == 3


async def test_a_failed_probe_reopens_for_a_full_cool_down() -> None:
    clock, upstream = Clock(), Flaky()
    breaker = CircuitBreakerMiddleware(upstream.app, failure_threshold=1, reset_timeout_s=30, clock=clock)
    await post(breaker)
    clock.advance(30)
    assert (await post(breaker)).json() == {"status": 503}  # the probe reached the upstream, and failed
    assert breaker.states() == {"upstream": "open"}
    assert (await post(breaker)).headers["retry-after"] == "30"


def test_probe_now_cuts_an_open_circuits_cool_down_short_and_leaves_others_alone() -> None:
    # A router that sees a down upstream answer again (gateway/upstreams/router.py) lets it be probed at once.
    clock, changes = Clock(), []
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=30)
    opened = Breaker("u", policy, clock=clock, on_change=lambda *change: changes.append(change))
    closed = Breaker("v", policy, clock=clock, on_change=lambda *change: changes.append(change))
    opened.record(opened.admit(), Outcome.FAILURE)  # type: ignore[arg-type]
    assert opened.admit() is None
    opened.probe_now()
    closed.probe_now()
    assert (opened.state, closed.state) == ("half_open", "closed")
    assert changes == [("u", "closed", "open"), ("u", "open", "half_open")]
    probe = opened.admit()
    assert probe is not None and probe.probe
    opened.record(probe, Outcome.FAILURE)  # a failed probe: a full cool-down again
    assert opened.state == "open" and opened.retry_after_s() == 30


async def test_several_probes_must_all_succeed_to_close() -> None:
    clock = Clock()
    b = Breaker("u", BreakerPolicy(failure_threshold=1, reset_timeout_s=5, half_open_max_probes=2), clock=clock, on_change=lambda *c: None)
    b.record(b.admit(), Outcome.FAILURE)  # type: ignore[arg-type]
    clock.advance(5)
    first, second = b.admit(), b.admit()
    assert first is not None and second is not None and b.admit() is None
    b.record(first, Outcome.SUCCESS)
    assert b.state == "half_open"
    b.record(second, Outcome.SUCCESS)
    assert b.state == "closed"


class Behaviour:
    """Inline ASGI apps, one per kind of ending, for the outcome table."""

    @staticmethod
    def status(code: int, headers: list[tuple[bytes, bytes]] | None = None) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": code, "headers": headers or []})
            await send({"type": "http.response.body", "body": b"{}"})

        return app

    @staticmethod
    def raising(error: Exception, *, after_start: bool = False) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if after_start:
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
                await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
            raise error

        return app


OUTCOMES: list[tuple[str, ASGIApp, Outcome]] = [
    ("connect-error", Behaviour.raising(UpstreamUnavailable()), Outcome.FAILURE),
    ("upstream-timeout", Behaviour.raising(UpstreamTimeout()), Outcome.FAILURE),
    ("gateway-timeout", Behaviour.raising(GatewayTimeout()), Outcome.FAILURE),
    ("stream-cut-mid-way", Behaviour.raising(StreamCut(), after_start=True), Outcome.FAILURE),
    ("500", Behaviour.status(500), Outcome.FAILURE),
    ("502", Behaviour.status(502), Outcome.FAILURE),
    ("unknown-exception", Behaviour.raising(RuntimeError("bug")), Outcome.FAILURE),
    ("200", Behaviour.status(200), Outcome.SUCCESS),
    ("400-bad-request", Behaviour.status(400), Outcome.SUCCESS),
    ("404-unknown-model", Behaviour.status(404), Outcome.SUCCESS),
    ("context-overflow", Behaviour.status(400, [(b"x-lmgate-error", b"context_length_exceeded")]), Outcome.SUCCESS),
    ("lmgate-refusal", Behaviour.raising(Overloaded()), Outcome.NEUTRAL),
    ("client-left", Behaviour.raising(ClientDisconnected()), Outcome.NEUTRAL),
]


@pytest.mark.parametrize(("app", "expected"), [case[1:] for case in OUTCOMES], ids=[case[0] for case in OUTCOMES])
async def test_what_counts_as_a_failure(app: ASGIApp, expected: Outcome) -> None:
    breaker = CircuitBreakerMiddleware(app, failure_threshold=2, clock=Clock())
    circuit = breaker.breaker("upstream")
    circuit.record(circuit.admit(), Outcome.FAILURE)  # type: ignore[arg-type]  # one failure already
    with contextlib.suppress(RuntimeError):  # ErrorMiddleware renders an unknown error, then re-raises it
        await ErrorMiddleware(breaker)(http_scope(), body_then_silence(), discard)
    # A failure opens it (2 in a row), a success resets the count, a neutral outcome leaves it.
    state, count = {Outcome.FAILURE: ("open", 2), Outcome.SUCCESS: ("closed", 0), Outcome.NEUTRAL: ("closed", 1)}[expected]
    assert (circuit.state, circuit.consecutive_failures) == (state, count)


class GpuFell(UpstreamError):
    """A package's own leaf of the upstream family, with a code no layer knows."""

    code = "gpu_fell_off_the_bus"


class QuotaSpent(Overload):
    """A package's own refusal, rendered with a header naming an upstream failure."""

    code = "quota_spent"


TYPED_OUTCOMES: list[tuple[str, ASGIApp, Outcome]] = [
    ("custom-upstream-leaf", Behaviour.raising(GpuFell()), Outcome.FAILURE),
    ("refusal-saying-upstream-in-its-header", Behaviour.raising(QuotaSpent(headers=[("X-Lmgate-Error", "upstream_unavailable")])), Outcome.NEUTRAL),
    # A response is judged by its status alone: a 503 is the upstream's, whatever its header says.
    ("503-response-with-a-refusal-header", Behaviour.status(503, [(b"x-lmgate-error", b"overloaded")]), Outcome.FAILURE),
]


@pytest.mark.parametrize(("app", "expected"), [case[1:] for case in TYPED_OUTCOMES], ids=[case[0] for case in TYPED_OUTCOMES])
async def test_outcomes_come_from_types_not_header_strings(app: ASGIApp, expected: Outcome) -> None:
    breaker = CircuitBreakerMiddleware(app, failure_threshold=1, clock=Clock())
    await ErrorMiddleware(breaker)(http_scope(), body_then_silence(), discard)
    assert breaker.states() == {"upstream": "open" if expected is Outcome.FAILURE else "closed"}


async def test_a_refusal_from_a_layer_inside_is_neutral_when_the_breaker_stands_alone() -> None:
    # No ErrorMiddleware: the breaker is the error layer for what it wraps, so the inner layer
    # raises its refusal (the breaker judges the type) and the breaker renders it.
    async def refuses(scope: Scope, receive: Receive, send: Send) -> None:
        raise Overloaded(retry_after_s=2)

    breaker = CircuitBreakerMiddleware(refuses, failure_threshold=1, clock=Clock())
    response = await post(breaker)
    assert (response.status_code, response.headers["x-lmgate-error"], response.headers["retry-after"]) == (503, "overloaded", "2")
    assert breaker.states() == {"upstream": "closed"}


async def test_a_stream_is_judged_when_it_ends_not_when_it_starts() -> None:
    seen_mid_stream: list[tuple[str, int]] = []

    async def cut_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        circuit = breaker.breaker("upstream")
        seen_mid_stream.append((circuit.state, circuit.consecutive_failures))
        raise StreamCut()

    breaker = CircuitBreakerMiddleware(cut_stream, failure_threshold=1, clock=Clock())
    with pytest.raises(StreamCut):
        await breaker(http_scope(), body_then_silence(), discard)
    assert seen_mid_stream == [("closed", 0)]  # a 200 with headers sent was not yet a success
    assert breaker.states() == {"upstream": "open"}


async def test_a_deadline_cancelling_the_request_counts_as_a_failure() -> None:
    async def hang(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep_forever()

    breaker = CircuitBreakerMiddleware(hang, failure_threshold=1, clock=Clock())
    response = await post(TimeoutMiddleware(breaker, first_token_s=0.05))
    assert response.status_code == 504
    assert breaker.states() == {"upstream": "open"}


async def test_a_cancellation_that_is_not_a_deadline_is_not_a_failure() -> None:
    entered = anyio.Event()

    async def hang(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await anyio.sleep_forever()

    breaker = CircuitBreakerMiddleware(hang, failure_threshold=1, clock=Clock())
    app = TimeoutMiddleware(breaker, first_token_s=60)
    async with anyio.create_task_group() as tg:  # e.g. a shutdown cancelling in-flight requests
        tg.start_soon(app, http_scope(), body_then_silence(), discard)
        await entered.wait()
        tg.cancel_scope.cancel()
    circuit = breaker.breaker("upstream")
    assert (circuit.state, circuit.consecutive_failures) == ("closed", 0)


def test_an_outcome_from_before_the_circuit_opened_is_ignored() -> None:
    clock = Clock()
    b = Breaker("u", BreakerPolicy(failure_threshold=2), clock=clock, on_change=lambda *c: None)
    slow = b.admit()
    for _ in range(2):
        b.record(b.admit(), Outcome.FAILURE)  # type: ignore[arg-type]
    assert b.state == "open"
    b.record(slow, Outcome.SUCCESS)  # type: ignore[arg-type]  # it started while the circuit was closed
    assert b.state == "open"


async def test_per_model_circuits_are_separate() -> None:
    async def fails_for_a(scope: Scope, receive: Receive, send: Send) -> None:
        body = (await receive())["body"]
        status = 502 if b'"a"' in body else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    breaker = CircuitBreakerMiddleware(fails_for_a, failure_threshold=1, per_model=True, clock=Clock())
    assert (await post(breaker, b'{"model":"a"}')).status_code == 502
    shed = await post(breaker, b'{"model":"a"}')
    assert shed.json()["error"]["code"] == "circuit_open"
    assert "upstream:a" in shed.json()["error"]["message"]
    ok = await post(breaker, b'{"model":"b"}')
    assert (ok.status_code, ok.content) == (200, b'{"model":"b"}')  # the body was replayed inward
    assert breaker.states() == {"upstream": "closed", "upstream:a": "open", "upstream:b": "closed"}


async def test_per_model_circuits_are_bounded() -> None:
    breaker = CircuitBreakerMiddleware(Behaviour.status(200), per_model=True, max_keys=2, clock=Clock())
    for model in ("a", "b", "c"):
        await post(breaker, b'{"model":"%s"}' % model.encode())
    assert len(breaker.states()) == 2 and "upstream" in breaker.states()


def test_a_failure_ratio_over_the_window_opens_the_circuit() -> None:
    clock = Clock()
    policy = BreakerPolicy(failure_threshold=100, failure_ratio=0.5, window_s=60, min_requests=4)
    b = Breaker("u", policy, clock=clock, on_change=lambda *c: None)
    for outcome in (Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE):
        b.record(b.admit(), outcome)  # type: ignore[arg-type]
    assert b.state == "closed"  # 3 outcomes: below min_requests
    clock.advance(61)  # those fall out of the window
    for outcome in (Outcome.SUCCESS, Outcome.SUCCESS, Outcome.FAILURE):
        b.record(b.admit(), outcome)  # type: ignore[arg-type]
    assert b.state == "closed"
    b.record(b.admit(), Outcome.FAILURE)  # type: ignore[arg-type]  # 2 of 4 in the window
    assert b.state == "open"


def test_a_failing_observer_does_not_break_the_circuit() -> None:
    def broken(key: str, old: str, new: str) -> None:
        raise RuntimeError("metrics down")

    b = Breaker("u", BreakerPolicy(failure_threshold=1), clock=Clock(), on_change=broken)
    b.record(b.admit(), Outcome.FAILURE)  # type: ignore[arg-type]
    assert b.state == "open"


@pytest.mark.parametrize(
    "options",
    [{"failure_threshold": 0}, {"failure_ratio": 1.5}, {"reset_timeout_s": 0}, {"half_open_max_probes": 0}, {"max_keys": 0}],
)
def test_invalid_options_fail_at_construction(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CircuitBreakerMiddleware(Behaviour.status(200), **options)  # type: ignore[arg-type]


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    await CircuitBreakerMiddleware(app)({"type": "lifespan"}, body_then_silence(), discard)
    assert seen == ["lifespan"]


# --- helpers --------------------------------------------------------------------------------------


def http_scope() -> Scope:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


def body_then_silence() -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


async def discard(message: Message) -> None:
    pass
