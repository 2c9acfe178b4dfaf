"""TimeoutMiddleware: first-token, idle and total deadlines, before and after the response started.

Inline apps wait forever (or until cancelled), so each deadline is what ends them; no test sleeps to
synchronise. Stream endings are asserted through a real hypercorn server, because
``httpx.ASGITransport`` collects the whole body before the client sees any of it.
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.server.serving import serve_in_background
from middleware.timeout import TimeoutMiddleware
from middleware.types import ASGIApp, Receive, Scope, Send

pytestmark = pytest.mark.anyio

SSE = [(b"content-type", b"text/event-stream")]
FIRST_FRAME = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'


class Stalling:
    """Sends ``messages``, then waits forever; records whether it was cancelled (its ``finally``)."""

    def __init__(self, *messages: dict[str, object]) -> None:
        self.messages = messages
        self.cancelled = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            for message in self.messages:
                await send(message)
            await anyio.sleep_forever()
        finally:
            self.cancelled.set()


async def post(app: ASGIApp, body: bytes = b'{"model":"m"}') -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lmgate") as client:
        return await client.post("/v1/chat/completions", content=body)


async def test_no_first_token_before_the_deadline_is_a_504_and_cancels_the_upstream() -> None:
    upstream = Stalling()
    response = await post(TimeoutMiddleware(upstream, first_token_s=0.05))
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert "first-token" in response.json()["error"]["message"]
    assert response.headers["x-lmgate-error"] == "timeout"
    assert upstream.cancelled.is_set()


async def test_headers_without_a_body_are_still_within_the_first_token_deadline() -> None:
    upstream = Stalling({"type": "http.response.start", "status": 200, "headers": SSE})
    response = await post(TimeoutMiddleware(upstream, first_token_s=0.05, idle_s=60))
    # The event stream had started, so the error arrives as its last frame.
    assert response.status_code == 200
    assert response.content.startswith(b"event: error\ndata: ")
    assert json.loads(response.content.split(b"data: ", 1)[1])["error"]["code"] == "timeout"


async def test_a_plain_starlette_app_times_out_with_504() -> None:
    async def slow(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    app = Starlette(
        routes=[Route("/v1/chat/completions", slow, methods=["POST"])],
        middleware=[Middleware(TimeoutMiddleware, first_token_s=0.05)],
    )
    response = await post(app)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


async def test_idle_timeout_mid_stream_ends_with_an_error_frame_and_cancels_the_upstream() -> None:
    upstream = Stalling(
        {"type": "http.response.start", "status": 200, "headers": SSE},
        {"type": "http.response.body", "body": FIRST_FRAME, "more_body": True},
    )
    app = TimeoutMiddleware(upstream, first_token_s=5, idle_s=0.2)
    chunks: list[bytes] = []
    async with (
        serve_in_background(app) as server,
        httpx.AsyncClient(timeout=5, trust_env=False) as client,
        client.stream("POST", server.url + "/v1/chat/completions", content=b"{}") as response,
    ):
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
    assert chunks[0] == FIRST_FRAME  # the first token reached the client before the deadline passed
    tail = b"".join(chunks[1:])
    assert tail.startswith(b"event: error\ndata: ")
    error = json.loads(tail.split(b"data: ", 1)[1])["error"]
    assert error["code"] == "timeout" and "idle" in error["message"]
    assert upstream.cancelled.is_set()


async def test_a_started_non_sse_body_is_aborted_not_ended_cleanly() -> None:
    upstream = Stalling(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": b'{"choices":[', "more_body": True},
    )
    app = TimeoutMiddleware(upstream, idle_s=0.1)
    async with (
        serve_in_background(app) as server,
        httpx.AsyncClient(timeout=5, trust_env=False) as client,
        client.stream("POST", server.url + "/v1/completions", content=b"{}") as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await response.aread()
    assert upstream.cancelled.is_set()


async def test_the_total_deadline_ends_a_stream_that_never_goes_quiet() -> None:
    cancelled = anyio.Event()

    async def trickling(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        try:
            while True:
                await send({"type": "http.response.body", "body": FIRST_FRAME, "more_body": True})
                await anyio.sleep(0.01)  # pacing, well inside the idle deadline
        finally:
            cancelled.set()

    response = await post(TimeoutMiddleware(trickling, first_token_s=5, idle_s=5, total_s=0.2))
    last = response.content.rsplit(b"\n\n", 2)[-2]
    assert last.startswith(b"event: error\ndata: ")
    assert "total" in json.loads(last.split(b"data: ", 1)[1])["error"]["message"]
    assert cancelled.is_set()


async def test_per_model_overrides_set_the_deadline_the_inner_app_sees() -> None:
    async def report_deadline(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the replayed body
        left = anyio.current_effective_deadline() - anyio.current_time()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(left).encode()})

    app = TimeoutMiddleware(report_deadline, first_token_s=45, per_model={"big-70b": {"first_token_s": 120}})
    big = (await post(app, b'{"model":"big-70b"}')).json()
    small = (await post(app, b'{"model":"tiny-1b"}')).json()
    assert 119 < big <= 120
    assert 44 < small <= 45
    assert app.deadlines_for("big-70b").idle_s == 30.0  # keys not overridden keep the defaults


async def test_a_finished_response_is_left_alone() -> None:
    async def quick(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    response = await post(TimeoutMiddleware(quick, first_token_s=0.5))
    assert (response.status_code, response.content) == (200, b"done")


@pytest.mark.parametrize(
    "options",
    [{"first_token_s": 0}, {"idle_s": -1}, {"total_s": float("nan")}, {"per_model": {"m": {"first_token": 5}}}],
)
def test_invalid_options_fail_at_construction(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TimeoutMiddleware(Stalling(), **options)  # type: ignore[arg-type]


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> dict[str, object]:
        raise AssertionError("not used")

    await TimeoutMiddleware(app, first_token_s=0.01)({"type": "lifespan"}, receive, receive)  # type: ignore[arg-type]
    assert seen == ["lifespan"]

