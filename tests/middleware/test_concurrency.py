"""ConcurrencyMiddleware: limits, FIFO queue, shedding, disconnects, streams, per-model and adaptive.

Requests are driven straight through the middleware (or through httpx's ASGITransport when whole
bodies are fine). Inline apps block on anyio Events, so the test decides exactly when each request
finishes; ``wait_all_tasks_blocked`` is the only "wait until things settle".
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.server.serving import serve_in_background
from middleware._adaptive import AimdLimit
from middleware.concurrency import ConcurrencyMiddleware, _Limiter
from middleware.types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Call:
    """One request driven through an ASGI app by hand: what it sent back, and a way to leave."""

    def __init__(self, tag: str, *, model: str | None = None, client: str | None = None) -> None:
        self.tag = tag
        body = {"model": model} if model else {}
        self.body = json.dumps(body).encode()
        headers = [(b"x-tag", tag.encode()), (b"content-type", b"application/json")]
        if client:
            headers.append((b"x-client", client.encode()))
        self.scope: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
        self.sent: list[Message] = []
        self.body_delivered = False
        self.left = anyio.Event()

    async def receive(self) -> Message:
        if not self.body_delivered:
            self.body_delivered = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def run(self, app: object) -> None:
        await app(self.scope, self.receive, self.send)  # type: ignore[operator]

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None

    def header(self, name: bytes) -> bytes | None:
        return dict(self.sent[0]["headers"]).get(name) if self.sent else None

    def json(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


class GatedApp:
    """Records each request's tag on arrival, then answers only once its gate is opened."""

    def __init__(self) -> None:
        self.arrived: list[str] = []
        self.bodies: list[bytes] = []
        self.gates: dict[str, anyio.Event] = {}
        self.all_open = False

    def gate(self, tag: str) -> anyio.Event:
        return self.gates.setdefault(tag, anyio.Event())

    def open(self, tag: str) -> None:
        self.gate(tag).set()

    def open_all(self) -> None:
        self.all_open = True
        for gate in self.gates.values():
            gate.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tag = dict(scope["headers"])[b"x-tag"].decode()
        self.arrived.append(tag)
        self.bodies.append((await receive())["body"])
        if not self.all_open:
            await self.gate(tag).wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": tag.encode()})


async def start(tg: anyio.abc.TaskGroup, app: object, *calls: Call) -> None:
    """Start each call in turn, letting it settle (run, queue or be shed) before the next."""
    for call in calls:
        tg.start_soon(call.run, app)
        await anyio.wait_all_tasks_blocked()


# --- limit, queue, shed ---------------------------------------------------------------------------


async def test_twenty_requests_through_limit_four_and_queue_eight_around_starlette() -> None:
    go = anyio.Event()

    async def completions(request: Request) -> JSONResponse:
        await go.wait()
        return JSONResponse({"ok": True})

    starlette = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    app = ConcurrencyMiddleware(starlette, limit=4, max_queue=8)
    responses: list[httpx.Response] = []

    async def post(client: httpx.AsyncClient) -> None:
        responses.append(await client.post("/v1/chat/completions", json={"model": "m"}))

    transport = httpx.ASGITransport(app=app)
    with anyio.fail_after(5):
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://lmgate") as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(20):
                tg.start_soon(post, client)
            await anyio.wait_all_tasks_blocked()
            assert app.snapshot() == {"*": {"limit": 4, "in_flight": 4, "queued": 8}}
            assert len(responses) == 8  # shed at once, not after waiting
            go.set()

    served = [r for r in responses if r.status_code == 200]
    shed = [r for r in responses if r.status_code == 503]
    assert (len(served), len(shed)) == (12, 8)
    for response in shed:
        assert response.headers["x-lmgate-error"] == "overloaded"
        assert response.headers["retry-after"] == "5"  # nothing finished yet: the default
        assert response.json()["error"]["code"] == "overloaded"
    assert app.snapshot() == {"*": {"limit": 4, "in_flight": 0, "queued": 0}}


async def test_queue_is_fifo_and_the_replayed_body_reaches_the_app() -> None:
    inner = GatedApp()
    app = ConcurrencyMiddleware(inner, limit=1, max_queue=5)
    calls = [Call(tag) for tag in "abcde"]
    async with anyio.create_task_group() as tg:
        await start(tg, app, *calls)
        assert app.snapshot()["*"] == {"limit": 1, "in_flight": 1, "queued": 4}
        for call in calls:
            inner.open(call.tag)
            await anyio.wait_all_tasks_blocked()
    assert inner.arrived == list("abcde")
    assert inner.bodies == [b"{}"] * 5
    assert [c.status for c in calls] == [200] * 5


async def test_max_wait_expiry_sheds_the_waiter() -> None:
    inner = GatedApp()
    app = ConcurrencyMiddleware(inner, limit=1, max_queue=4, max_wait_s=0.05)
    holder, waiter = Call("holder"), Call("waiter")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await start(tg, app, holder)
            await waiter.run(app)  # returns once its 50 ms are up
            assert app.snapshot()["*"]["queued"] == 0
            inner.open_all()
    assert waiter.status == 503
    assert waiter.json()["error"]["code"] == "overloaded"
    assert b"within 0.05 s" in waiter.sent[1]["body"]
    assert inner.arrived == ["holder"]


async def test_queued_client_that_leaves_is_removed_at_once_and_the_next_takes_its_place() -> None:
    inner = GatedApp()
    app = ConcurrencyMiddleware(inner, limit=1, max_queue=1)
    holder, leaver, next_in_line = Call("holder"), Call("leaver"), Call("next")
    async with anyio.create_task_group() as tg:
        await start(tg, app, holder, leaver)
        assert app.snapshot()["*"]["queued"] == 1
        leaver.left.set()
        await anyio.wait_all_tasks_blocked()
        assert app.snapshot()["*"]["queued"] == 0
        await start(tg, app, next_in_line)  # the queue (size 1) has room again
        assert app.snapshot()["*"] == {"limit": 1, "in_flight": 1, "queued": 1}
        inner.open_all()
    assert inner.arrived == ["holder", "next"]
    assert leaver.sent == []
    assert next_in_line.status == 200


async def test_slot_handed_to_a_waiter_the_moment_it_leaves_passes_to_the_next() -> None:
    inner = GatedApp()
    app = ConcurrencyMiddleware(inner, limit=1, max_queue=2)
    holder, leaver, last = Call("holder"), Call("leaver"), Call("last")
    async with anyio.create_task_group() as tg:
        await start(tg, app, holder, leaver, last)
        inner.open("holder")  # frees the slot for `leaver` ...
        leaver.left.set()  # ... in the same tick as `leaver` gives up
        inner.open("last")
    assert inner.arrived == ["holder", "last"]
    assert app.snapshot()["*"] == {"limit": 1, "in_flight": 0, "queued": 0}


async def test_a_waiter_abandoning_a_granted_slot_releases_it() -> None:
    limiter = _Limiter(1, None)
    assert limiter.try_acquire()
    first, second = limiter.enqueue(), limiter.enqueue()
    limiter.release()
    assert first.granted and limiter.in_flight == 1
    limiter.abandon(first)  # gave up just as the slot arrived
    assert second.granted and limiter.in_flight == 1
    limiter.abandon(second)
    assert (limiter.in_flight, len(limiter.waiters)) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue() -> None:
    inner = GatedApp()
    app = ConcurrencyMiddleware(inner, limit=1, max_queue=1)
    async with anyio.create_task_group() as tg:
        await start(tg, app, Call("holder"))
        async with anyio.create_task_group() as waiting:
            await start(waiting, app, Call("waiter"))
            assert app.snapshot()["*"]["queued"] == 1
            waiting.cancel_scope.cancel()
        assert app.snapshot()["*"] == {"limit": 1, "in_flight": 1, "queued": 0}
        inner.open_all()
    assert app.snapshot()["*"]["in_flight"] == 0


async def test_app_errors_release_the_slot() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    app = ConcurrencyMiddleware(broken, limit=1)
    with pytest.raises(RuntimeError):
        await Call("a").run(app)
    assert app.snapshot()["*"]["in_flight"] == 0


# --- streams --------------------------------------------------------------------------------------


async def test_slot_is_held_until_the_streamed_body_finishes() -> None:
    finish = anyio.Event()

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan support needed
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await finish.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    app = ConcurrencyMiddleware(streaming, limit=1, max_queue=0)
    with anyio.fail_after(5):
        async with (
            serve_in_background(app, graceful_timeout_s=0.5) as server,
            httpx.AsyncClient(base_url=server.url) as client,
        ):
            async with client.stream("POST", "/v1/chat/completions", json={}) as stream:
                chunks = stream.aiter_raw()
                assert await chunks.__anext__() == b"data: 1\n\n"  # headers and a frame are out
                assert app.snapshot()["*"]["in_flight"] == 1
                refused = await client.post("/v1/chat/completions", json={})
                assert refused.status_code == 503
                finish.set()
                assert b"".join([c async for c in chunks]) == b"data: [DONE]\n\n"
            await anyio.wait_all_tasks_blocked()
            assert app.snapshot()["*"]["in_flight"] == 0
            assert (await client.post("/v1/chat/completions", json={})).status_code == 200


# --- keys -----------------------------------------------------------------------------------------


async def test_per_model_limits_are_independent() -> None:
    inner = GatedApp()
    app = ConcurrencyMiddleware(inner, limit=1, max_queue=1, per_model=True)
    calls = [Call("x1", model="x"), Call("y1", model="y"), Call("x2", model="x")]
    async with anyio.create_task_group() as tg:
        await start(tg, app, *calls)
        assert inner.arrived == ["x1", "y1"]
        assert app.snapshot() == {
            "x": {"limit": 1, "in_flight": 1, "queued": 1},
            "y": {"limit": 1, "in_flight": 1, "queued": 0},
        }
        inner.open_all()
    assert [c.status for c in calls] == [200, 200, 200]


async def test_per_client_limits_answer_429() -> None:
    inner = GatedApp()
    app = ConcurrencyMiddleware(inner, limit=1, max_queue=0, client_key=lambda s: dict(s["headers"])[b"x-client"].decode())
    first, again, other = Call("a1", client="a"), Call("a2", client="a"), Call("b1", client="b")
    async with anyio.create_task_group() as tg:
        await start(tg, app, first, again, other)
        assert again.status == 429
        assert again.header(b"x-lmgate-error") == b"rate_limited"
        assert set(app.snapshot()) == {"a/*", "b/*"}
        inner.open_all()
    assert inner.arrived == ["a1", "b1"]


async def test_refusals_while_reading_the_key_are_rendered() -> None:
    app = ConcurrencyMiddleware(GatedApp(), per_model=True)
    call = Call("big")
    call.scope["headers"].append((b"content-length", b"999999999999"))
    await call.run(app)
    assert call.status == 413


# --- Retry-After ----------------------------------------------------------------------------------


async def test_retry_after_follows_the_observed_service_rate() -> None:
    clock = FakeClock()
    inner = GatedApp()
    app = ConcurrencyMiddleware(inner, limit=2, max_queue=0, clock=clock)

    async def fill_and_shed(round_: int, hold_s: float) -> Call:
        calls = [Call(f"{round_}-{i}") for i in range(3)]
        async with anyio.create_task_group() as tg:
            await start(tg, app, *calls)
            clock.now += hold_s
            inner.open_all()
        inner.all_open = False
        return calls[2]

    assert (await fill_and_shed(1, 30.0)).header(b"retry-after") == b"5"  # default: nothing observed
    # Slots were held 30 s each, 2 at a time: the newcomer is served in 30 / 2 s.
    assert (await fill_and_shed(2, 30.0)).header(b"retry-after") == b"15"


@pytest.mark.parametrize(
    ("hold_s", "queued", "limit", "expected"),
    [
        (None, 3, 4, 7.0),  # no completion yet: the default
        (8.0, 3, 4, 8.0),  # 4 ahead at 0.5 per second
        (0.1, 0, 4, 1.0),  # floor
        (300.0, 8, 4, 60.0),  # ceiling
    ],
)
async def test_retry_after_estimate(hold_s: float | None, queued: int, limit: int, expected: float) -> None:
    limiter = _Limiter(limit, None)
    if hold_s is not None:
        limiter.hold_s.add(hold_s)
    for _ in range(queued):
        limiter.enqueue()
    assert limiter.retry_after_s(7.0) == expected


# --- adaptive -------------------------------------------------------------------------------------


async def test_adaptive_limit_falls_when_the_upstream_slows_and_recovers_when_it_speeds_up() -> None:
    clock = FakeClock()
    inner = GatedApp()
    app = ConcurrencyMiddleware(
        inner, limit=4, max_queue=0, adaptive=True, min_limit=1, max_limit=8, latency_threshold_s=5.0, clock=clock
    )

    async def batch(latency_s: float) -> int:
        """As many requests as the limit allows, each taking ``latency_s`` to its first byte."""
        calls = [Call(f"r{i}") for i in range(app.snapshot()["*"]["limit"])]
        async with anyio.create_task_group() as tg:
            await start(tg, app, *calls)
            clock.now += latency_s
            inner.open_all()
        inner.all_open = False
        inner.gates.clear()
        assert all(c.status == 200 for c in calls)
        return app.snapshot()["*"]["limit"]

    fast = [await batch(1.0) for _ in range(3)]
    slow = [await batch(20.0) for _ in range(6)]
    recovered = [await batch(1.0) for _ in range(12)]
    assert fast[-1] == 8
    assert slow == sorted(slow, reverse=True) and slow[-1] == 1
    assert recovered[-1] == 8


@pytest.mark.parametrize(
    ("latencies", "in_flight", "expected"),
    [
        ([1.0], 4, 5),  # fast and in use: +1
        ([1.0], 1, 4),  # fast but app-limited: unchanged
        ([9.0], 4, 3),  # slow: floor(4 * 0.9)
        ([9.0] * 10, 4, 1),  # never below min_limit
        ([1.0] * 10, 8, 8),  # never above max_limit
        ([1.0, 9.0], 4, 6),  # one slow sample does not lift the average past 5 s
    ],
)
def test_aimd_limit(latencies: list[float], in_flight: int, expected: int) -> None:
    limit = AimdLimit(initial=4, min_limit=1, max_limit=8, latency_threshold_s=5.0)
    for latency in latencies:
        limit.observe(latency, in_flight)
    assert limit.limit == expected


# --- plumbing -------------------------------------------------------------------------------------


async def test_non_http_scopes_and_exempt_paths_pass_through() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    app = ConcurrencyMiddleware(inner, limit=1, max_queue=0, exempt_paths={"/health"})
    await app({"type": "lifespan"}, Call("x").receive, Call("x").send)
    await app({"type": "http", "path": "/health", "headers": []}, Call("x").receive, Call("x").send)
    assert seen == ["lifespan", "http"]
    assert app.snapshot()["*"]["in_flight"] == 0


@pytest.mark.parametrize(
    "options",
    [
        {"limit": 0},
        {"max_queue": -1},
        {"max_wait_s": -1.0},
        {"default_retry_after_s": 0},
        {"adaptive": True, "limit": 32},
        {"adaptive": True, "min_limit": 0},
        {"adaptive": True, "latency_threshold_s": 0},
    ],
)
def test_invalid_options_fail_at_construction(options: dict) -> None:
    with pytest.raises(ValueError):
        ConcurrencyMiddleware(GatedApp(), **options)
