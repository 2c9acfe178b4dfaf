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

from gateway.app import Gateway, build_app, serve_gateway
from gateway.config.settings import Config
from gateway.proxy.aiohttp_transport import AiohttpTransport
from gateway.proxy.transport import FramingGuard
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, Simulator
from gateway.telemetry import RequestOutcome
from gateway.telemetry.tracing import build_tracer_provider

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def frame(text: str, finish: str | None = None) -> bytes:
    delta = "{}" if finish else '{"content":"' + text + '"}'
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


def chat_only(upstream, handler):  # type: ignore[no-untyped-def]
    """Script the upstream's chat route; anything else lmgate asks (model listings) gets a 404."""

    async def route(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["path"] != CHAT:
            await send({"type": "http.response.start", "status": 404, "headers": JSON})
            await send({"type": "http.response.body", "body": b'{"error":"Unexpected endpoint or method."}'})
            return
        await handler(scope, receive, send)

    upstream.handler = route


def chat_headers(upstream) -> list[dict[bytes, bytes]]:  # type: ignore[no-untyped-def]
    return [dict(scope["headers"]) for scope, _ in upstream.requests if scope["path"] == CHAT]


@dataclass
class Traced:
    url: str
    app: Gateway
    exporter: InMemorySpanExporter
    ended: anyio.abc.ObjectReceiveStream[RequestOutcome]

    def spans(self, kind: SpanKind) -> list[ReadableSpan]:
        """Finished spans of ``kind``; client spans only for chat attempts (not model listings)."""
        spans = [span for span in self.exporter.get_finished_spans() if span.kind is kind]
        if kind is SpanKind.CLIENT:
            spans = [span for span in spans if str(dict(span.attributes or {}).get("http.url")).endswith(CHAT)]
        return spans


@asynccontextmanager
async def traced_gateway(upstream_url: str, *, tracing: bool = True, transport: str = "httpx") -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = Config.model_validate(
        {"upstream": {"url": upstream_url, "transport": transport}, "retry": {"backoff_base_s": 0.01}}
    )
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


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_a_stream_is_one_server_span_with_genai_attributes_under_the_clients_trace(upstream, client, transport):
    async def handler(scope, receive, send):
        await answer(send, usage=True)

    chat_only(upstream, handler)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 9}
    async with traced_gateway(upstream.url, transport=transport) as gw:
        # The span per attempt comes from httpx's instrumentation, whatever moves the bytes under it.
        assert isinstance(gw.app.client._transport, AiohttpTransport if transport == "aiohttp" else FramingGuard)
        response = await client.post(gw.url + CHAT, json=body, headers={"traceparent": CLIENT_TRACEPARENT})
        with anyio.fail_after(5):
            await gw.ended.receive()
    assert response.status_code == 200 and b'"usage"' not in response.content
    [server] = gw.spans(SpanKind.SERVER)
    [attempt] = gw.spans(SpanKind.CLIENT)
    # Nothing per chunk: the server span and upstream calls (model listings may add their own).
    assert {span.kind for span in gw.exporter.get_finished_spans()} == {SpanKind.SERVER, SpanKind.CLIENT}
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
    assert attributes["lmgate.upstream"] == "default"  # one upstream: its name
    # The upstream got the attempt span's context, in the client's trace.
    [sent] = chat_headers(upstream)
    assert sent[b"traceparent"].decode() == f"00-{TRACE_ID}-{attempt.context.span_id:016x}-01"


async def test_a_stream_the_client_cancels_ends_its_span_as_client_cancelled(client):
    slow = SimModel(id="slow-7b", loaded=True, tokens_per_second=5.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[slow]) as sim, traced_gateway(sim.url) as gw:
        body = {"model": slow.id, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with client.stream("POST", gw.url + CHAT, json=body) as response:
            await anext(response.aiter_raw())
        with anyio.fail_after(5):
            outcome = await gw.ended.receive()
            await sim.wait_for(lambda counters: counters.disconnects == 1)
    assert outcome.category == "client_cancelled"
    [server] = gw.spans(SpanKind.SERVER)
    assert len(gw.spans(SpanKind.CLIENT)) == 1
    assert server.attributes is not None and server.attributes["error.type"] == "client_cancelled"
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["gen_ai.response.time_to_first_chunk"] > 0


async def test_a_retried_request_has_one_client_span_per_attempt_and_a_retry_event(upstream, client):
    async def handler(scope, receive, send):
        if len(chat_headers(upstream)) == 1:
            await send({"type": "http.response.start", "status": 503, "headers": JSON})
            await send({"type": "http.response.body", "body": b'{"error":"busy"}'})
            return
        await answer(send, usage=False)

    chat_only(upstream, handler)
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

    chat_only(upstream, handler)
    async with traced_gateway(upstream.url, tracing=False) as gw:
        body = {"model": "m", "messages": [], "stream": True}
        await client.post(gw.url + CHAT, json=body, headers={"traceparent": CLIENT_TRACEPARENT})
        with anyio.fail_after(5):
            await gw.ended.receive()
    assert gw.app.telemetry.tracing is None
    assert not getattr(gw.app.client, "_is_instrumented_by_opentelemetry", False)
    assert gw.exporter.get_finished_spans() == ()
    assert [sent[b"traceparent"] for sent in chat_headers(upstream)] == [CLIENT_TRACEPARENT.encode()]


@pytest.mark.parametrize(
    ("section", "env", "service", "sampler"),
    [
        ({"exporter": "console"}, {}, "lmgate", "ParentBased{root:AlwaysOnSampler"),
        ({"exporter": "console", "sample_ratio": 0.25}, {"OTEL_SERVICE_NAME": "edge"}, "edge", "TraceIdRatio"),
        ({"endpoint": "http://127.0.0.1:9/x", "service_name": "gw"}, {"OTEL_SERVICE_NAME": "x"}, "gw", "AlwaysOn"),
    ],
)
def test_the_provider_is_built_from_yaml_and_the_otel_variables(monkeypatch, section, env, service, sampler):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = Config.model_validate({"tracing": {"enabled": True, **section}})
    provider = build_tracer_provider(config.tracing, resource={"lmgate.config_hash": config.digest()})
    try:
        assert provider.resource.attributes["service.name"] == service
        assert provider.resource.attributes["lmgate.config_hash"] == config.digest()
        assert sampler in provider.sampler.get_description()
    finally:
        provider.shutdown()


async def test_the_span_names_the_upstream_that_served_and_its_address(client):
    """Two simulators: each request's span says which upstream served it (``lmgate.upstream``) and
    that upstream's address; the attempt under it went to that upstream."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sims = Simulator(models=[SimModel(id="alpha", loaded=True)]), Simulator(models=[SimModel(id="beta", loaded=True)])
    async with sims[0] as a, sims[1] as b:
        config = Config.model_validate({"upstreams": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]})
        async with serve_gateway(config, tracer_provider=provider) as (url, app):
            ended_send, ended = anyio.create_memory_object_stream[RequestOutcome](8)
            app.telemetry.on_request_end.append(lambda record, outcome: ended_send.send_nowait(outcome))
            for model in ("beta", "alpha"):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                assert (await client.post(url + CHAT, json=body)).status_code == 200
            with ended_send, ended, anyio.fail_after(5):
                for _ in range(2):
                    await ended.receive()
    servers = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]
    seen = [(span.name, dict(span.attributes or {})) for span in servers]
    assert [(name, attrs["lmgate.upstream"], attrs["server.port"]) for name, attrs in seen] == [
        ("chat beta", "b", b.port), ("chat alpha", "a", a.port)
    ]
    for server, sim in zip(servers, (b, a), strict=True):
        [attempt] = [
            span for span in exporter.get_finished_spans()
            if span.kind is SpanKind.CLIENT and span.parent is not None and span.parent.span_id == server.context.span_id
            and str(dict(span.attributes or {}).get("http.url")).endswith(CHAT)  # not the model-state refreshes
        ]
        assert str(dict(attempt.attributes or {})["http.url"]).startswith(sim.url)
