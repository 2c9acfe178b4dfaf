"""HeartbeatMiddleware: silent streams get SSE comments; slow ones are started early; warm ones untouched.

Inline apps are scripted with events, not sleeps: an app that "takes a while" waits until the test
has seen the heartbeats it wants, so every assertion is about order, never about luck. Message lists
are recorded in-process (exact ASGI messages); the end-to-end shape over a socket is covered in
tests/gateway/test_coldstart.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from gateway.simulator.testing import ASGICall
from middleware.errors import ErrorMiddleware, Overloaded, StreamCut
from middleware.heartbeat import HeartbeatMiddleware, comment_frame, event_frame
from middleware.types import ASGIApp, Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(lmgate_loop: str) -> tuple[str, dict[str, bool]]:
    """Both loops lmgate runs on: the layer arms its timers with the running loop itself."""
    return ("asyncio", {"use_uvloop": lmgate_loop == "uvloop"})

INTERVAL_S = 0.1
SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
FRAME = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def body(chunk: bytes, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": more}


class Recorder(ASGICall):
    """An in-process call (``ASGICall``) with waits on what the app has sent so far."""

    def __init__(self, app: ASGIApp, *, stream: bool = True, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(app, "POST", "/v1/chat/completions", {"model": "m", "stream": stream}, headers)

    async def run(self) -> None:
        await self.call()

    async def wait_for(self, predicate: Callable[[Recorder], bool]) -> None:
        with anyio.fail_after(5):
            while not predicate(self):
                await self.changed.wait()

    @property
    def raw(self) -> bytes:
        return self.body_bytes

    def comments(self) -> int:
        return sum(line.startswith(b":") for line in self.raw.split(b"\n"))


class Scripted:
    """An app that runs ``steps``: messages to send, or awaitables (zero-argument callables) to wait on."""

    def __init__(self, *steps: Any) -> None:
        self.steps = steps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for step in self.steps:
            if callable(step):
                await step()
            else:
                await send(step)


async def run(recorder: Recorder) -> Recorder:
    with anyio.fail_after(5):
        await recorder.run()
    return recorder


def heartbeats(app: ASGIApp, **options: Any) -> HeartbeatMiddleware:
    return HeartbeatMiddleware(app, interval_s=INTERVAL_S, **options)


async def test_a_warm_stream_reaches_the_client_exactly_as_the_app_sent_it() -> None:
    messages = [SSE_START, body(FRAME), body(FRAME), body(DONE), body(b"", more=False)]
    recorder = await run(Recorder(heartbeats(Scripted(*messages))))
    assert recorder.messages == messages


async def test_a_slow_stream_is_started_early_and_kept_alive_until_the_app_answers() -> None:
    holder: dict[str, Recorder] = {}

    async def after_three_heartbeats() -> None:
        await holder["r"].wait_for(lambda r: r.comments() >= 3)

    inner_start = {**SSE_START, "headers": [*SSE_START["headers"], (b"x-lmgate-model-state", b"cold"), (b"x-powered-by", b"Express")]}
    app = heartbeats(Scripted(after_three_heartbeats, inner_start, body(FRAME), body(DONE), body(b"", more=False)))
    recorder = holder["r"] = Recorder(app)
    await run(recorder)

    start = recorder.messages[0]
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"text/event-stream"
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    assert b"x-request-id" in headers
    assert [m["type"] for m in recorder.messages].count("http.response.start") == 1  # the app's was swallowed
    beats = recorder.raw.split(b"\n\n")
    assert all(beat.startswith(b": lmgate waiting elapsed_s=") for beat in beats[:3])
    # The app's headers that still matter arrive as one comment, then its frames, untouched.
    assert recorder.raw.endswith(b": lmgate x-lmgate-model-state=cold\n\n" + FRAME + DONE)
    assert recorder.messages[-1]["more_body"] is False


async def test_an_error_answer_after_an_early_start_becomes_an_sse_error_frame() -> None:
    holder: dict[str, Recorder] = {}
    error = {"error": {"message": "The model is loading", "type": "server_error", "code": "model_loading"}}

    async def after_a_heartbeat() -> None:
        await holder["r"].wait_for(lambda r: r.comments() >= 1)

    app = heartbeats(
        Scripted(
            after_a_heartbeat,
            {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]},
            body(json.dumps(error).encode(), more=False),
        )
    )
    recorder = holder["r"] = Recorder(app)
    await run(recorder)
    assert recorder.messages[0]["status"] == 200
    last = recorder.messages[-1]
    assert last["more_body"] is False
    assert last["body"] == event_frame("error", error)


async def test_a_non_sse_success_after_an_early_start_is_reported_not_passed_off_as_a_stream() -> None:
    holder: dict[str, Recorder] = {}

    async def after_a_heartbeat() -> None:
        await holder["r"].wait_for(lambda r: r.comments() >= 1)

    app = heartbeats(
        Scripted(
            after_a_heartbeat,
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
            body(b'{"choices": []}', more=False),
        )
    )
    recorder = holder["r"] = Recorder(app)
    await run(recorder)
    (frame,) = [f for f in recorder.raw.split(b"\n\n") if f.startswith(b"event: error")]
    assert json.loads(frame.split(b"data: ", 1)[1])["error"]["code"] == "upstream_protocol_error"


async def test_an_exception_after_an_early_start_is_rendered_in_band_by_the_error_layer() -> None:
    holder: dict[str, Recorder] = {}

    async def fail_after_a_heartbeat() -> None:
        await holder["r"].wait_for(lambda r: r.comments() >= 1)
        raise Overloaded()

    recorder = holder["r"] = Recorder(ErrorMiddleware(heartbeats(Scripted(fail_after_a_heartbeat))))
    await run(recorder)
    assert recorder.messages[0]["status"] == 200
    assert recorder.raw.endswith(b"\n\nevent: error\ndata: " + json.dumps(Overloaded().to_dict(), separators=(",", ":")).encode() + b"\n\n")
    assert recorder.messages[-1]["more_body"] is False


async def test_a_silence_mid_stream_gets_heartbeats_between_frames() -> None:
    holder: dict[str, Recorder] = {}

    async def two_heartbeats() -> None:
        await holder["r"].wait_for(lambda r: r.comments() >= 2)

    app = heartbeats(Scripted(SSE_START, body(FRAME), two_heartbeats, body(FRAME), body(DONE), body(b"", more=False)))
    recorder = holder["r"] = Recorder(app)
    await run(recorder)
    frames = recorder.raw.split(b"\n\n")
    assert frames[0] == FRAME.rstrip(b"\n")
    assert frames[1].startswith(b": lmgate waiting") and frames[2].startswith(b": lmgate waiting")
    assert recorder.raw.endswith(FRAME + DONE)


async def test_no_heartbeat_goes_inside_a_half_sent_frame() -> None:
    async def quiet_for_three_intervals() -> None:
        await anyio.sleep(3 * INTERVAL_S)  # the scenario: a silence inside a frame

    half, rest = FRAME[:10], FRAME[10:]
    app = heartbeats(Scripted(SSE_START, body(half), quiet_for_three_intervals, body(rest), body(DONE), body(b"", more=False)))
    recorder = await run(Recorder(app))
    assert recorder.raw == FRAME + DONE


async def test_a_request_that_does_not_ask_for_a_stream_is_never_started_early() -> None:
    answer = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}

    async def three_intervals() -> None:
        await anyio.sleep(3 * INTERVAL_S)  # the scenario: a slow non-streaming answer

    recorder = await run(Recorder(heartbeats(Scripted(three_intervals, answer, body(b"{}", more=False))), stream=False))
    assert recorder.messages == [answer, body(b"{}", more=False)]


async def test_accept_event_stream_counts_as_asking_for_a_stream_and_describe_sets_the_text() -> None:
    holder: dict[str, Recorder] = {}

    async def after_a_heartbeat() -> None:
        await holder["r"].wait_for(lambda r: r.comments() >= 1)

    app = heartbeats(
        Scripted(after_a_heartbeat, SSE_START, body(DONE, more=False)),
        describe=lambda scope, elapsed: comment_frame(f"custom {scope['path']}"),
    )
    recorder = holder["r"] = Recorder(app, stream=False, headers=[(b"accept", b"text/event-stream")])
    await run(recorder)
    assert recorder.raw == b": custom /v1/chat/completions\n\n" + DONE


@pytest.mark.parametrize("interval", [0, -1, float("inf"), True])
def test_the_interval_must_be_a_positive_finite_number(interval: float) -> None:
    with pytest.raises(ValueError):
        HeartbeatMiddleware(Scripted(), interval_s=interval)


async def test_a_request_with_no_heartbeat_due_runs_in_the_callers_task_with_no_task_beside_it() -> None:
    # The layer wraps every request: a background task (or a task group) per request is a real cost
    # on the hot path, so it only arms a timer with the event loop until a heartbeat is due.
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["task"], seen["tasks"] = asyncio.current_task(), asyncio.all_tasks()
        await send(SSE_START)
        await send(body(DONE, more=False))

    before = asyncio.all_tasks()
    recorder = await run(Recorder(heartbeats(app)))
    assert recorder.raw == DONE
    assert seen["task"] is asyncio.current_task()
    assert seen["tasks"] == before


async def test_a_failing_heartbeat_send_cancels_the_app_and_propagates_as_itself() -> None:
    class Gone(Exception):
        pass

    app_cancelled = anyio.Event()

    async def wait_forever() -> None:
        try:
            with anyio.CancelScope():  # the app's own scopes do not swallow the layer's cancellation
                await anyio.sleep_forever()
        finally:
            app_cancelled.set()

    async def failing_send(message: Message) -> None:
        raise Gone()

    recorder = Recorder(heartbeats(Scripted(wait_forever)))
    recorder._send = failing_send  # type: ignore[method-assign]
    with anyio.fail_after(5), pytest.raises(Gone):
        await recorder.run()
    assert app_cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # no cancellation leaks out


class BlockingBeats(Recorder):
    """A client whose heartbeat sends hang until ``release`` is set (the app's own sends do not)."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.beat_started = anyio.Event()
        self.release = anyio.Event()
        self.order: list[str] = []

    async def _send(self, message: Message) -> None:
        if message.get("body", b"").startswith(b": lmgate waiting"):
            self.beat_started.set()
            try:
                await self.release.wait()
            except BaseException:
                self.order.append("beat cancelled")
                raise
            self.order.append("beat sent")
        await super()._send(message)


async def test_a_heartbeat_under_way_is_sent_before_the_layer_returns() -> None:
    holder: dict[str, BlockingBeats] = {}

    async def return_during_a_heartbeat() -> None:
        await holder["r"].beat_started.wait()
        holder["r"].release.set()  # the send can finish now, but only once the app has returned

    recorder = holder["r"] = BlockingBeats(heartbeats(Scripted(return_during_a_heartbeat)))
    with anyio.fail_after(5), pytest.raises(StreamCut):  # started early, then no answer
        await recorder.run()
    recorder.order.append("layer returned")
    assert recorder.order == ["beat sent", "layer returned"]


async def test_a_cancelled_request_cancels_its_heartbeat_under_way_and_leaves_no_task() -> None:
    recorder = BlockingBeats(heartbeats(Scripted(anyio.sleep_forever)))
    before = asyncio.all_tasks()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(recorder.run)
            await recorder.beat_started.wait()
            group.cancel_scope.cancel()
    recorder.order.append("layer returned")
    assert recorder.order == ["beat cancelled", "layer returned"]
    assert asyncio.all_tasks() == before
