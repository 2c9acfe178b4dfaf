"""DrainMiddleware and DrainState: refuse new work, let streams finish, end the stragglers honestly.

Streams are asserted through a real hypercorn server; the rest drives the middleware by hand.
Inline apps block on anyio Events, so the test decides when each request may finish.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.server.serving import serve_in_background
from middleware.concurrency import ConcurrencyMiddleware
from middleware.drain import DrainMiddleware, DrainState
from middleware.errors import Draining, ErrorMiddleware
from middleware.types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio

HTTP: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


def body_then_silence() -> Receive:
    """A client's receive channel: an empty body, then nothing (the client never leaves)."""
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> Message:
        for message in messages:
            return message
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


def recording(sent: list[Message]) -> Send:
    async def send(message: Message) -> None:
        sent.append(message)

    return send


def app_that_sends(*messages: Message, then: anyio.Event) -> tuple[list[str], object]:
    """An app that sends ``messages``, waits for ``then`` and finishes; it logs how it ended."""
    log: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan support needed
        try:
            for message in messages:
                await send(message)
            await then.wait()
            await send({"type": "http.response.body", "body": b""})
            log.append("finished")
        finally:
            log.append("cleaned up")

    return log, app


START_SSE: Message = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


# --- the drain sequence through a real server -----------------------------------------------------


async def test_new_requests_refused_while_an_in_flight_stream_completes_around_starlette() -> None:
    state = DrainState()
    finish = anyio.Event()

    async def frames() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await finish.wait()
        yield b"data: [DONE]\n\n"

    async def completions(request: Request) -> StreamingResponse:
        return StreamingResponse(frames(), media_type="text/event-stream")

    async def ready(request: Request) -> Response:
        return Response(status_code=503 if state.draining else 200)

    starlette = Starlette(routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/health/ready", ready),
    ])
    app = DrainMiddleware(starlette, state=state, exempt_paths={"/health/ready"})
    with anyio.fail_after(5):
        async with (
            serve_in_background(app, graceful_timeout_s=0.5) as server,
            httpx.AsyncClient(base_url=server.url) as client,
        ):
            async with client.stream("POST", "/v1/chat/completions", json={}) as stream:
                chunks = stream.aiter_raw()
                assert await chunks.__anext__() == b"data: 1\n\n"
                assert (await client.get("/health/ready")).status_code == 200
                state.start()
                assert (await client.get("/health/ready")).status_code == 503
                refused = await client.post("/v1/chat/completions", json={})
                assert refused.status_code == 503
                assert refused.headers["connection"] == "close"
                assert refused.headers["retry-after"] == "5"
                assert refused.json()["error"]["code"] == "draining"
                assert state.in_flight == 1
                finish.set()
                assert b"".join([c async for c in chunks]) == b"data: [DONE]\n\n"
            assert await state.wait_idle(1.0)
    assert state.in_flight == 0


async def test_streams_still_open_at_the_deadline_end_with_an_sse_error_frame() -> None:
    state = DrainState()
    log, inner = app_that_sends(
        START_SSE, {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True}, then=anyio.Event()
    )
    with anyio.fail_after(5):
        async with (
            serve_in_background(DrainMiddleware(inner, state=state), graceful_timeout_s=0.5) as server,
            httpx.AsyncClient(base_url=server.url) as client,
            client.stream("POST", "/v1/chat/completions", json={}) as stream,
        ):
            chunks = stream.aiter_raw()
            assert await chunks.__anext__() == b"data: 1\n\n"
            state.start()
            assert not await state.wait_idle(0.05)  # the deadline passes, the stream still open
            state.abort_remaining()
            assert await state.wait_idle(1.0)  # True only once the frames are out
            rest = b"".join([c async for c in chunks])
    assert rest.startswith(b"event: error\ndata: ")
    assert json.loads(rest.split(b"data: ", 1)[1])["error"]["code"] == "draining"
    assert b"[DONE]" not in rest
    assert log == ["cleaned up"]  # the inner app (the proxy) was cancelled and closed its upstream


# --- how aborted requests end ---------------------------------------------------------------------


async def abort_one(inner: object) -> tuple[list[Message], list[Draining]]:
    """Admit one request, start draining, abort it at once; return what it sent and raised."""
    state = DrainState()
    app = DrainMiddleware(inner, state=state)  # type: ignore[arg-type]
    sent: list[Message] = []
    raised: list[Draining] = []

    async def serve() -> None:
        try:
            await app(dict(HTTP), body_then_silence(), recording(sent))
        except Draining as error:
            raised.append(error)

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        await anyio.wait_all_tasks_blocked()
        state.start()
        state.abort_remaining()
        assert await state.wait_idle(1.0)
    return sent, raised


async def test_abort_before_the_response_started_answers_503_draining() -> None:
    log, inner = app_that_sends(then=anyio.Event())
    sent, raised = await abort_one(inner)
    assert raised == []
    assert sent[0]["status"] == 503
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "draining"
    assert log == ["cleaned up"]


async def test_abort_of_a_started_plain_body_aborts_the_transfer() -> None:
    log, inner = app_that_sends(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": b'{"partial":', "more_body": True},
        then=anyio.Event(),
    )
    sent, raised = await abort_one(inner)
    assert len(sent) == 2  # nothing added to the half-sent body
    assert len(raised) == 1  # propagates: the server drops the connection without the final chunk
    assert log == ["cleaned up"]


async def test_responses_starting_during_a_drain_close_the_connection() -> None:
    state = DrainState()
    go = anyio.Event()
    sent: list[Message] = []

    async def late(scope: Scope, receive: Receive, send: Send) -> None:
        await go.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(DrainMiddleware(late, state=state), dict(HTTP), body_then_silence(), recording(sent))
        await anyio.wait_all_tasks_blocked()
        state.start()
        go.set()
    assert sent[0]["headers"] == [(b"content-type", b"text/plain"), (b"connection", b"close")]
    assert await state.wait_idle(0)


async def test_requests_queued_behind_the_limiter_at_the_deadline_get_503_draining() -> None:
    state = DrainState()
    _, inner = app_that_sends(START_SSE, then=anyio.Event())
    limiter = ConcurrencyMiddleware(inner, limit=1, max_queue=1)
    app = DrainMiddleware(limiter, state=state)
    streamed: list[Message] = []
    queued: list[Message] = []

    async with anyio.create_task_group() as tg:
        for sent in (streamed, queued):
            tg.start_soon(app, dict(HTTP), body_then_silence(), recording(sent))
            await anyio.wait_all_tasks_blocked()
        assert limiter.snapshot()["*"] == {"limit": 1, "in_flight": 1, "queued": 1}
        state.start()
        state.abort_remaining()
        assert await state.wait_idle(1.0)
    assert streamed[-1]["body"].startswith(b"event: error")
    assert queued[0]["status"] == 503 and json.loads(queued[1]["body"])["error"]["code"] == "draining"
    assert limiter.snapshot()["*"] == {"limit": 1, "in_flight": 0, "queued": 0}


# --- accounting -----------------------------------------------------------------------------------


async def test_accounting_survives_an_unhandled_error() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    state = DrainState()
    app = ErrorMiddleware(DrainMiddleware(broken, state=state))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # the 500 is rendered, then re-raised
    async with httpx.AsyncClient(transport=transport, base_url="http://lmgate") as client:
        response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 500
    assert state.in_flight == 0
    assert await state.wait_idle(0)


async def test_wait_idle_returns_at_once_when_nothing_runs() -> None:
    with anyio.fail_after(1):
        assert await DrainState().wait_idle(30.0)


def test_state_needs_no_event_loop_and_start_is_idempotent() -> None:
    now = [100.0]
    state = DrainState(clock=lambda: now[0])
    assert (state.draining, state.in_flight, state.elapsed_s) == (False, 0, 0.0)
    state.start()
    now[0] = 104.0
    state.start()  # a second signal does not restart the clock
    assert state.draining and state.elapsed_s == 4.0
    state.abort_remaining()  # nothing running: a no-op


async def test_non_http_scopes_and_exempt_paths_pass_through_while_draining() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    state = DrainState()
    state.start()
    app = DrainMiddleware(inner, state=state, exempt_paths={"/health/live"})
    await app({"type": "lifespan"}, body_then_silence(), inner)  # type: ignore[arg-type]
    await app({**HTTP, "path": "/health/live"}, body_then_silence(), inner)  # type: ignore[arg-type]
    assert seen == ["lifespan", "http"]
    assert state.in_flight == 0


def test_retry_after_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        DrainMiddleware(lambda s, r, w: None, state=DrainState(), retry_after_s=-1.0)  # type: ignore[arg-type,return-value]
