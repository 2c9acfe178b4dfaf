"""Non-streaming answers lmgate assembles from a stream (gateway/proxy/assemble.py), through a real
lmgate: the usage lmgate counts when the upstream streams none, and what ``/api/v0`` adds to a
whole answer (``stats``, ``model_info``), checked field by field against LM Studio's own answer."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import build_app
from gateway.config.settings import Config
from gateway.proxy.assemble import CompletionAssembler
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, SimSettings, Simulator

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
THINKER = "reasoning-7b"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about gateways, please."}]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    # A finite speed, so that the timing lmgate measures for /api/v0's stats is a real one.
    models = [
        SimModel(id=MODEL, loaded=True, tokens_per_second=100.0, ttft_base_s=0.02, ttft_per_prompt_token_s=0.0,
                 arch="qwen2", quantization="Q8_0"),
        SimModel(id=THINKER, loaded=True, tokens_per_second=400.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0,
                 reasoning_tokens=4),
    ]
    async with Simulator(models=models, settings=SimSettings(completion_tokens=12)) as simulator:
        yield simulator


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


class Finished:
    """The records of requests the gateway finished, in order (telemetry's ``on_request_end``)."""

    def __init__(self, app: Any) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Any](16)
        app.telemetry.on_request_end.append(lambda record, outcome: self.send.send_nowait((record, outcome)))

    async def next(self) -> tuple[Any, Any]:
        with anyio.fail_after(5):
            return await self.receive.receive()


@asynccontextmanager
async def running_gateway(upstream_url: str, **sections: dict[str, Any]) -> AsyncIterator[tuple[str, Any, Finished]]:
    document: dict[str, Any] = {"upstream": {"url": upstream_url}, "retry": {"enabled": False}, **sections}
    app = build_app(Config.model_validate(document))
    finished = Finished(app)
    try:
        async with serve_in_background(app) as server:
            yield server.url, app, finished
    finally:
        await app.aclose()


def counted_samples(scrape: str) -> dict[tuple[str, str], float]:
    """``lmgate_token_usage_counted_total`` by (token type, source)."""
    return {
        (sample.labels["gen_ai_token_type"], sample.labels["source"]): sample.value
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        if sample.name == "lmgate_token_usage_counted_total"
    }


# --- usage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [MODEL, THINKER])
async def test_the_sdk_gets_usage_lmgate_counted_when_the_upstream_streams_none(sim, client, caplog, model):
    sim.settings.stream_usage = False  # llama-cpp-python's server ignores stream_options.include_usage
    direct = (await client.post(sim.url + "/v1/chat/completions", json={"model": model, "messages": MESSAGES})).json()
    caplog.set_level(logging.INFO, logger="lmgate.telemetry")
    async with running_gateway(sim.url) as (gateway, _, finished):
        sdk = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
        try:
            raw = await sdk.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        finally:
            await sdk.close()
        record, outcome = await finished.next()
        scrape = (await client.get(gateway + "/metrics")).text
    reply = raw.parse()
    assert reply.usage is not None
    # One token per delta frame (as LM Studio and llama.cpp send them), reasoning included; the
    # prompt estimated at four characters a token, as the simulator counts it.
    assert reply.usage.model_dump(exclude_none=True) == direct["usage"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert raw.headers["x-lmgate-usage"] == "counted; prompt=estimated"
    assert reply.choices[0].message.content == direct["choices"][0]["message"]["content"]
    # Telemetry reports the counted figures and says how they were obtained.
    assert (outcome.tokens_in, outcome.tokens_out) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "gen_success"]
    assert (line.tokens_in_source, line.tokens_out_source) == ("estimated", "counted")  # type: ignore[attr-defined]
    assert counted_samples(scrape) == {("input", "estimated"): 1.0, ("output", "counted"): 1.0}


async def test_the_upstreams_own_usage_is_kept_and_not_marked(sim, client, caplog):
    caplog.set_level(logging.INFO, logger="lmgate.telemetry")
    async with running_gateway(sim.url) as (gateway, _, finished):
        response = await client.post(gateway + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        await finished.next()
        scrape = (await client.get(gateway + "/metrics")).text
    direct = (await client.post(sim.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})).json()
    assert response.json()["usage"] == direct["usage"]
    assert "x-lmgate-usage" not in response.headers
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "gen_success"]
    assert (line.tokens_in_source, line.tokens_out_source) == ("upstream", "upstream")  # type: ignore[attr-defined]
    assert counted_samples(scrape) == {}


def _engine_stream(content: list[str]) -> list[bytes]:
    """A llama.cpp-style chat stream without a usage frame (json.dumps spacing, a role-only first delta)."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    deltas = [{"role": "assistant"}] + [{"content": piece} for piece in content]
    frames = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    frames.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return [b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames] + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize(
    ("route", "answer"),
    [("/extras/tokenize/count", {"count": 7}), ("/tokenize", {"tokens": [1, 2, 3, 4, 5, 6, 7]})],
    ids=["llama-cpp-python", "llama.cpp"],
)
async def test_prompt_tokens_come_from_the_upstreams_tokenizer_when_it_has_one(upstream, client, route, answer):
    async def handler(scope, receive, send):
        if scope["path"] == "/v1/chat/completions":
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            for frame in _engine_stream(["Hel", "lo", "!"]):
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif scope["path"] == route:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
        else:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"detail":"Not Found"}'})

    upstream.handler = handler
    body = {"model": "m", "messages": MESSAGES}
    async with running_gateway(upstream.url, models={"enabled": False}) as (gateway, _, finished):
        first = await client.post(gateway + "/v1/chat/completions", json=body)
        await finished.next()
        second = await client.post(gateway + "/v1/chat/completions", json=body)
    for response in (first, second):
        assert response.status_code == 200
        assert response.json()["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                                             "completion_tokens_details": {"reasoning_tokens": 0}}
        assert response.headers["x-lmgate-usage"] == "counted"
    asked = [(scope["path"], json.loads(sent)) for scope, sent in upstream.requests if scope["path"] != "/v1/chat/completions"]
    text = "".join(m["content"] for m in MESSAGES)
    # Found once, then asked directly.
    assert asked[-2:] == [(route, asked[-1][1])] * 2 and asked[0][0] == "/extras/tokenize/count"
    assert text in json.dumps(asked[-1][1]) and len(asked) == (2 if route == "/extras/tokenize/count" else 3)


# --- /api/v0: stats and model_info -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/api/v0/chat/completions", {"model": MODEL, "messages": MESSAGES}),
        ("/api/v0/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5}),
    ],
    ids=["chat", "text"],
)
@pytest.mark.parametrize("models_enabled", [True, False], ids=["registry", "no-registry"])
@pytest.mark.parametrize("stream_usage", [True, False], ids=["upstream-usage", "counted-usage"])
async def test_an_assembled_v0_answer_matches_lm_studios_field_by_field(sim, client, route, body, models_enabled,
                                                                        stream_usage):
    sim.settings.stream_usage = stream_usage
    direct = (await client.post(sim.url + route, json=body)).json()
    async with running_gateway(sim.url, models={"enabled": models_enabled}) as (gateway, _, _finished):
        response = await client.post(gateway + route, json=body)
    assembled = response.json()
    assert response.status_code == 200
    # LM Studio's answer has `runtime` too; no route of LM Studio tells which engine runs a model,
    # so lmgate leaves it out rather than invent one.
    assert set(assembled) == set(direct) - {"runtime"}
    for field in ("object", "model", "choices", "usage", "model_info"):
        assert assembled[field] == direct[field], field
    assert isinstance(assembled["id"], str) and isinstance(assembled["created"], int)
    stats, reference = assembled["stats"], direct["stats"]
    assert set(stats) == set(reference)
    assert stats["stop_reason"] == reference["stop_reason"]
    for key in ("tokens_per_second", "time_to_first_token", "generation_time"):
        assert isinstance(stats[key], float) and math.isfinite(stats[key]) and stats[key] >= 0, key
    # Measured from the upstream's headers to its first token: the simulated prefill (0.02 s) less
    # however late lmgate got to the headers on a busy machine, so only its sign is certain.
    assert stats["time_to_first_token"] > 0
    # The rate is the answer's tokens after the first over the time they took (generation_time is
    # rounded to milliseconds, as LM Studio rounds it). Frames 10 ms apart arrive apart unless the
    # machine stalls, and then the rate is 0: measured, not made up.
    tokens, rate = assembled["usage"]["completion_tokens"], stats["tokens_per_second"]
    if rate > 0:
        assert rate * stats["generation_time"] == pytest.approx(tokens - 1, abs=rate * 0.0005 + 1e-6)
    describe = sim.counters.routes.get(f"GET /api/v0/models/{MODEL}", 0)
    assert describe == (0 if models_enabled else 1)  # the registry's listing is reused where it exists


# --- the assembler alone, on a clock the test moves --------------------------------------------------


class StepClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sse(document: dict[str, Any]) -> str:
    return "data: " + json.dumps(document) + "\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    return sse({"id": "c1", "created": 1, "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra})


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [("stop", "eosFound"), ("length", "maxPredictedTokensReached"), ("tool_calls", "toolCalls")],
)
def test_v0_stats_are_timed_from_the_headers_to_the_first_and_last_token(finish, stop_reason):
    clock = StepClock()
    assembler = CompletionAssembler("v0-chat", clock=clock)  # the headers arrived at 100.0
    assembler.feed(chunk({"role": "assistant"}))  # no token: does not start the clock
    clock.now = 100.25
    assembler.feed(chunk({"content": "a"}))
    for step in range(1, 5):
        clock.now = 100.25 + step * 0.5
        assembler.feed(chunk({"content": "b"}))
    clock.now = 103.0
    assembler.feed(chunk({}, finish) + "data: [DONE]\n\n")
    body = assembler.result(prompt_tokens=3, model_info={"arch": "llama"})
    assert body["stats"] == {"tokens_per_second": 2.0, "time_to_first_token": 0.25, "generation_time": 2.0,
                             "stop_reason": stop_reason}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert body["model_info"] == {"arch": "llama"} and "runtime" not in body and "system_fingerprint" not in body
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": finish,
                                "message": {"role": "assistant", "content": "abbbb"}}]


def test_what_an_upstream_stream_does_carry_wins_over_what_lmgate_fills_in():
    upstream = {"stats": {"time_to_first_token": 0.111, "draft_model": "d"}, "model_info": {"arch": "granite"},
                "runtime": {"name": "llama.cpp", "version": "1.3.0", "supported_formats": ["gguf"]},
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    assembler = CompletionAssembler("v0-chat", clock=StepClock())
    assembler.feed(chunk({"content": "a"}) + sse({"id": "c1", "choices": [], **upstream}) + "data: [DONE]\n\n")
    body = assembler.result(model_info={"arch": "llama"})
    assert body["stats"]["time_to_first_token"] == 0.111 and body["stats"]["draft_model"] == "d"
    assert set(body["stats"]) == {"tokens_per_second", "time_to_first_token", "generation_time", "stop_reason", "draft_model"}
    assert (body["model_info"], body["runtime"], body["usage"]) == (upstream["model_info"], upstream["runtime"], upstream["usage"])
