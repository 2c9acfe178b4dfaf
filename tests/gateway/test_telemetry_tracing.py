"""Traces with the SDK's in-memory exporter: one server span per request, one client span per
upstream attempt, W3C context in and out, a cancelled stream and a retried request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.app import Gateway, build_app
from gateway.config import Config
from gateway.serving import serve_in_background
from gateway.telemetry import RequestOutcome

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
SSE = [(b"content-type", b"text/event-stream")]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def frame(text: str, finish: str | None = None) -> bytes:
    delta = "{}" if finish else '{"content":"%s"}' % text
    reason = f'"{finish}"' if finish else "null"
    return b'data: {"id":"c1","model":"m","choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\n\n' % (
        delta.encode(),
        reason.encode(),
    )


USAGE = b'data: {"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'


async def answer(send, *, usage: bool) -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": SSE})
    body = frame("a") + frame("b") + frame("", finish="stop") + (USAGE if usage else b"") + b"data: [DONE]\n\n"
    await send({"type": "http.response.body", "body": body})


@dataclass
class Traced:
    url: str
    app: Gateway
    exporter: InMemorySpanExporter
    ended: anyio.abc.ObjectReceiveStream[RequestOutcome]

    def spans(self, kind: SpanKind) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.kind is kind]


@asynccontextmanager
async def traced_gateway(upstream_url: str, *, tracing: bool = True) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = Config.model_validate({"upstream": {"url": upstream_url}, "retry": {"backoff_base_s": 0.01}})
    app = build_app(config, tracer_provider=provider if tracing else None)
    ended_send, ended = anyio.create_memory_object_stream[RequestOutcome](8)
    app.telemetry.on_request_end.append(lambda record, outcome: ended_send.send_nowait(outcome))
    with ended_send, ended:
        async with serve_in_background(app) as server:
            yield Traced(server.url, app, exporter, ended)
    await app.aclose()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as c:
        yield c


async def test_a_stream_is_one_server_span_with_genai_attributes_under_the_clients_trace(upstream, client):
    async def handler(scope, receive, send):
        await answer(send, usage=True)

    upstream.handler = handler
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 9}
    async with traced_gateway(upstream.url) as gw:
        response = await client.post(gw.url + CHAT, json=body, headers={"traceparent": CLIENT_TRACEPARENT})
        with anyio.fail_after(5):
            await gw.ended.receive()
    assert response.status_code == 200 and b'"usage"' not in response.content
    [server] = gw.spans(SpanKind.SERVER)
    [attempt] = gw.spans(SpanKind.CLIENT)
    assert len(gw.exporter.get_finished_spans()) == 2  # nothing per chunk
    assert server.name == "chat m"
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    attributes = dict(server.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "m"
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.request.max_tokens"] == 9
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (5, 2)
    assert 0 < attributes["gen_ai.response.time_to_first_chunk"] < 5
    assert attributes["http.response.status_code"] == 200
    assert "error.type" not in attributes
    # The upstream got the attempt span's context, in the client's trace.
    sent = dict(upstream.requests[0][0]["headers"])
    assert sent[b"traceparent"].decode() == f"00-{TRACE_ID}-{attempt.context.span_id:016x}-01"


async def test_a_stream_the_client_cancels_ends_its_span_as_client_cancelled(upstream, client):
    async def handler(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        await send({"type": "http.response.body", "body": frame("a"), "more_body": True})
        await upstream.disconnected.wait()

    upstream.handler = handler
    async with traced_gateway(upstream.url) as gw:
        body = {"model": "m", "messages": [], "stream": True}
        async with client.stream("POST", gw.url + CHAT, json=body) as response:
            await anext(response.aiter_raw())
        with anyio.fail_after(5):
            outcome = await gw.ended.receive()
    assert outcome.category == "client_cancelled"
    [server] = gw.spans(SpanKind.SERVER)
    assert len(gw.spans(SpanKind.CLIENT)) == 1
    assert server.attributes is not None and server.attributes["error.type"] == "client_cancelled"
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["gen_ai.response.time_to_first_chunk"] > 0


async def test_a_retried_request_has_one_client_span_per_attempt_and_a_retry_event(upstream, client):
    async def handler(scope, receive, send):
        if len(upstream.requests) == 1:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error":"busy"}'})
            return
        await answer(send, usage=False)

    upstream.handler = handler
    async with traced_gateway(upstream.url) as gw:
        response = await client.post(gw.url + CHAT, json={"model": "m", "messages": [], "stream": True})
        with anyio.fail_after(5):
            await gw.ended.receive()
    assert response.headers["x-lmgate-attempts"] == "2"
    [server] = gw.spans(SpanKind.SERVER)
    attempts = sorted(gw.spans(SpanKind.CLIENT), key=lambda span: span.start_time or 0)
    assert [span.attributes and span.attributes["http.status_code"] for span in attempts] == [503, 200]
    assert all(span.parent is not None and span.parent.span_id == server.context.span_id for span in attempts)
    assert server.attributes is not None and server.attributes["lmgate.attempts"] == 2
    events = {event.name: event for event in server.events}
    assert "lmgate.admitted" in events
    assert events["retry"].attributes is not None and events["retry"].attributes["lmgate.attempt"] == 1


async def test_with_tracing_off_nothing_is_instrumented_and_traceparent_passes_through(upstream, client):
    async def handler(scope, receive, send):
        await answer(send, usage=True)

    upstream.handler = handler
    async with traced_gateway(upstream.url, tracing=False) as gw:
        body = {"model": "m", "messages": [], "stream": True}
        await client.post(gw.url + CHAT, json=body, headers={"traceparent": CLIENT_TRACEPARENT})
        with anyio.fail_after(5):
            await gw.ended.receive()
    assert gw.app.telemetry.tracing is None
    assert not getattr(gw.app.client, "_is_instrumented_by_opentelemetry", False)
    assert gw.exporter.get_finished_spans() == ()
    assert dict(upstream.requests[0][0]["headers"])[b"traceparent"] == CLIENT_TRACEPARENT.encode()
