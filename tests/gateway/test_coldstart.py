"""Cold starts end to end: the whole gateway in front of the LM Studio simulator, over real sockets.

Time is scaled where it matters: the simulator runs ``RealClock(speed=100)`` for the headline case
(a 60 s load in 0.6 s, with lmgate's deadlines scaled alike), a ``FakeClock`` where the order of two
loads must be exact, and its default real clock with sub-second loads elsewhere. Heartbeats run
every 0.1 s, so a load spans several of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from itertools import pairwise
from typing import Any

import anyio
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.app import Gateway, build_app, serve_gateway
from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from gateway.simulator import FakeClock, RealClock, SimModel, SimSettings, Simulator
from gateway.simulator.testing import parse_sse
from middleware.types import Receive, Scope, Send

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 0.1
MESSAGES = [{"role": "user", "content": "Tell me about cold starts."}]
CHAT = "/v1/chat/completions"


def cold(model_id: str, load_delay_s: float = 0.5, **extra: Any) -> SimModel:
    fast = {"tokens_per_second": float("inf"), "ttft_base_s": 0.0, "ttft_per_prompt_token_s": 0.0}
    return SimModel(id=model_id, load_delay_s=load_delay_s, **{**fast, **extra})


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


@asynccontextmanager
async def lmgate(upstream_url: str, **sections: dict[str, Any]) -> AsyncIterator[tuple[str, Gateway]]:
    """The gateway (with its lifespan) in front of ``upstream_url``; heartbeats every 0.1 s by default."""
    document: dict[str, Any] = {"upstream": {"url": upstream_url}, "models": {"heartbeat_s": HEARTBEAT_S}}
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    async with serve_gateway(Config.model_validate(document)) as served:
        yield served


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


async def timed_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[httpx.Response, list[tuple[float, bytes]]]:
    """Stream ``body``; every chunk with the second it arrived (from the request's start)."""
    started = time.monotonic()
    async with client.stream("POST", url, json=body) as response:
        chunks = [(time.monotonic() - started, chunk) async for chunk in response.aiter_raw()]
    return response, chunks


def content(raw: bytes) -> str:
    events = [e for e in parse_sse(raw) if e.event is None and e.data and e.data != "[DONE]"]
    return "".join((e.json()["choices"] or [{}])[0].get("delta", {}).get("content") or "" for e in events)


def comments(raw: bytes) -> list[bytes]:
    return [line for line in raw.split(b"\n") if line.startswith(b":")]


# --- the headline: a load longer than the first-token deadline -----------------------------------


async def test_a_60_s_load_with_45_s_to_first_token_streams_the_whole_answer_under_heartbeats(client):
    # Scaled 100x: a 60 s load (0.6 s), first_token_s 45 s (0.45 s), heartbeat_s 10 s (0.1 s).
    model = cold("cold-70b", load_delay_s=60.0, tokens_per_second=200.0)
    async with (
        Simulator(models=[model], clock=RealClock(speed=100)) as sim,
        lmgate(sim.url, timeouts={"first_token_s": 0.45}) as (url, _),
    ):
        response, chunks = await timed_stream(client, url + CHAT, chat(model.id, stream=True))
        direct = await client.post(sim.url + CHAT, json=chat(model.id, stream=True))

    raw = b"".join(chunk for _, chunk in chunks)
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    assert raw.endswith(b"data: [DONE]\n\n") and content(raw) == content(direct.content) != ""
    loading = [line for line in comments(raw) if line.startswith(b": lmgate loading model=cold-70b elapsed_s=")]
    first_token_at = next(at for at, chunk in chunks if chunk.startswith(b"data: "))
    gaps = [b - a for (a, _), (b, _) in pairwise([(0.0, b""), *chunks]) if b <= first_token_at]
    assert len(loading) >= 4, comments(raw)
    assert max(gaps) < 2 * HEARTBEAT_S, f"silences before the first token: {[round(g, 3) for g in gaps]}"
    (carried,) = [line for line in comments(raw) if b"x-lmgate-model-state" in line]
    assert b"x-lmgate-model-state=cold" in carried
    assert int(carried.split(b"x-lmgate-load-ms=")[1].split()[0]) >= 550
    assert (sim.counters.loads_started, sim.counters.generations_completed) == (1, 2)


@pytest.mark.parametrize("load_method", ["rest", "generate"])
async def test_five_concurrent_first_requests_cause_one_load_and_one_instance(client, load_method):
    model = cold("cold-8b")
    race = SimSettings(duplicate_instance_race=True)  # LM Studio's JIT loads one instance per request
    async with Simulator(models=[model], settings=race) as sim, lmgate(sim.url, models={"load_method": load_method}) as (url, _):
        answers: list[httpx.Response] = []

        async def first_request() -> None:
            answers.append(await client.post(url + CHAT, json=chat(model.id)))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(first_request)
        metrics = (await client.get(url + "/metrics")).text
    assert [a.status_code for a in answers] == [200] * 5
    # Telemetry hears of the load once, not once per waiting request.
    assert 'lmgate_model_load_duration_seconds_count{gen_ai_request_model="cold-8b",outcome="ok",upstream="default"} 1.0' in metrics
    assert sim.counters.loads_started == 1 and sim.counters.instances == {model.id: 1}
    assert sorted(a.headers["x-lmgate-model-state"] for a in answers) == ["cold"] * 5


async def test_without_lmgate_the_same_five_requests_load_five_instances(client):
    # The control for the test above: the simulator's switch really reproduces #1751.
    model = cold("cold-8b")
    async with (
        Simulator(models=[model], settings=SimSettings(duplicate_instance_race=True)) as sim,
        anyio.create_task_group() as tg,
    ):
        for _ in range(5):
            tg.start_soon(partial(client.post, sim.url + CHAT, json=chat(model.id)))
    assert sim.counters.instances == {model.id: 5}


# --- what the client is told ---------------------------------------------------------------------


async def test_a_warm_model_is_forwarded_untouched_and_says_warm(client):
    model = SimModel(id="warm-7b", loaded=True, tokens_per_second=float("inf"), ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model], clock=FakeClock()) as sim, lmgate(sim.url) as (url, _):
        through = await client.post(url + CHAT, json=chat(model.id, stream=True))
        direct = await client.post(sim.url + CHAT, json=chat(model.id, stream=True))
    assert through.content == direct.content
    assert through.headers["x-lmgate-model-state"] == "warm" and "x-lmgate-load-ms" not in through.headers


async def test_a_short_load_needs_no_heartbeat_and_reports_cold_in_headers(client):
    model = cold("quick-1b", load_delay_s=0.2)
    async with Simulator(models=[model]) as sim, lmgate(sim.url, models={"heartbeat_s": 5.0}) as (url, _):
        response = await client.post(url + CHAT, json=chat(model.id, stream=True))
    assert response.headers["x-lmgate-model-state"] == "cold"
    assert int(response.headers["x-lmgate-load-ms"]) >= 150
    assert not comments(response.content)


async def test_a_cold_stream_that_heartbeats_started_says_cold_in_its_headers(client):
    # The load (0.5 s) outlasts heartbeat_s (0.1 s): the heartbeat layer sends the 200 before the
    # model is loaded. The cold-start layer knew by then that this request waits for a load, so
    # the early headers say so; the load time is known only later, in the carried comment.
    model = cold("cold-8b", load_delay_s=0.5)
    async with Simulator(models=[model]) as sim, lmgate(sim.url) as (url, _):
        response, chunks = await timed_stream(client, url + CHAT, chat(model.id, stream=True))
    raw = b"".join(chunk for _, chunk in chunks)
    assert chunks[0][1].startswith(b": lmgate loading model=cold-8b")  # heartbeats started the stream
    assert response.headers["x-lmgate-model-state"] == "cold" and "x-lmgate-load-ms" not in response.headers
    (carried,) = [line for line in comments(raw) if b"x-lmgate-load-ms=" in line]
    assert int(carried.split(b"x-lmgate-load-ms=")[1].split()[0]) >= 400
    assert raw.endswith(b"data: [DONE]\n\n") and sim.counters.loads_completed == 1


async def test_the_openai_sdk_skips_heartbeats_and_status_events_and_parses_the_answer(client):
    model = cold("cold-8b", load_delay_s=0.5)
    async with (
        Simulator(models=[model]) as sim,
        lmgate(sim.url, models={"status_events": True}) as (url, _),
    ):
        sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        try:
            stream = await sdk.chat.completions.create(model=model.id, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            chunks = [chunk async for chunk in stream]
            reply = await sdk.chat.completions.create(model=model.id, messages=MESSAGES)  # type: ignore[arg-type]
        finally:
            await sdk.close()
        raw = (await client.post(url + CHAT, json=chat("cold-8b", stream=True))).content
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and text == reply.choices[0].message.content
    # Comments never reach the SDK; a status event reaches it as an empty chunk, skipped like usage.
    status = [chunk for chunk in chunks if not chunk.choices]
    assert status and all(chunk.object == "lmgate.status" for chunk in status)  # type: ignore[comparison-overlap]
    assert b"event: lmgate.status" not in raw  # the model was warm by then: nothing to say


async def test_status_events_say_loading_with_elapsed_and_eta_once_a_load_was_measured(client):
    model = cold("cold-8b", load_delay_s=0.4)
    async with Simulator(models=[model]) as sim, lmgate(sim.url, models={"status_events": True}) as (url, app):
        assert (await client.post(url + f"/lmgate/models/{model.id}/load")).status_code == 200
        assert (await client.post(url + f"/lmgate/models/{model.id}/unload")).json()["unloaded"] == [model.id]
        raw = (await client.post(url + CHAT, json=chat(model.id, stream=True))).content
    statuses = [e.json() for e in parse_sse(raw) if e.event == "lmgate.status"]
    assert statuses and statuses[0]["state"] == "loading" and statuses[0]["model"] == model.id
    assert statuses[0]["eta_s"] == 1  # the first load took 0.4 s: under a second left, rounded up
    assert b": lmgate loading model=cold-8b elapsed_s=" in raw and b" eta_s=" in raw
    assert app.models.registry.find(model.id).load_count == 2  # type: ignore[union-attr]


# --- failures ------------------------------------------------------------------------------------


async def test_a_failing_load_is_model_load_failed_with_lm_studios_message_and_marks_the_model(client):
    model = cold("broken-8b", load_delay_s=0.3)
    async with Simulator(models=[model]) as sim, lmgate(sim.url) as (url, _):
        sim.inject_fault("load_failure", count=2, message="Operation canceled.")
        streamed = await client.post(url + CHAT, json=chat(model.id, stream=True))
        plain = await client.post(url + CHAT, json=chat(model.id))
        listing = (await client.get(url + "/lmgate/models")).json()
    (error,) = [e for e in parse_sse(streamed.content) if e.event == "error"]
    assert streamed.status_code == 200 and comments(streamed.content)  # heartbeats went out first
    assert error.json()["error"]["code"] == "model_load_failed"
    assert error.json()["error"]["message"] == 'Failed to load model "broken-8b". Error: Operation canceled.'
    assert plain.status_code == 502 and plain.json()["error"]["code"] == "model_load_failed"
    (entry,) = listing["models"]
    assert entry["state"] == "failed" and "Operation canceled." in entry["load_error"]
    assert sim.counters.generations_started == 0


async def test_a_model_the_upstream_does_not_list_gets_its_answer_even_after_a_failed_admin_load(client):
    # lmgate's own failed load of a model LM Studio does not have must not turn LM Studio's
    # 400 model_not_found into lmgate's 502 model_load_failed.
    async with Simulator(models=[cold("real-8b")]) as sim, lmgate(sim.url) as (url, _):
        load = await client.post(url + "/lmgate/models/no-such-model/load")
        response = await client.post(url + CHAT, json=chat("no-such-model"))
        listing = (await client.get(url + "/lmgate/models")).json()
    assert load.status_code == 502
    assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_found"
    assert {m["id"]: m["state"] for m in listing["models"]}["no-such-model"] == "failed"  # still shown


async def test_a_load_that_outlasts_load_timeout_s_fails_clearly(client):
    model = cold("hung-8b")
    async with Simulator(models=[model]) as sim, lmgate(sim.url, models={"load_timeout_s": 0.3}) as (url, _):
        sim.inject_fault("load_hang")
        started = time.monotonic()
        response = await client.post(url + CHAT, json=chat(model.id))
        elapsed = time.monotonic() - started
    assert response.status_code == 502 and response.json()["error"]["code"] == "model_load_failed"
    assert "models.load_timeout_s (0.3 s)" in response.json()["error"]["message"]
    assert elapsed >= 0.3  # the load hangs forever: ending at all means load_timeout_s ended it


async def test_a_client_that_leaves_during_the_load_does_not_break_it_for_the_others(client):
    model = cold("cold-8b", load_delay_s=0.6)
    async with Simulator(models=[model]) as sim, lmgate(sim.url) as (url, app):
        results: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:

            async def stays() -> None:
                results.append(await client.post(url + CHAT, json=chat(model.id, stream=True)))

            tg.start_soon(stays)
            async with client.stream("POST", url + CHAT, json=chat(model.id, stream=True)) as leaving:
                await anext(leaving.aiter_raw())  # a heartbeat: the load is under way; now hang up
            registry = app.models.registry
            await registry.wait_for(lambda r: r.records[model.id].in_flight == 1)  # lmgate let it go
            assert registry.records[model.id].state == "loading"
    (answer,) = results
    assert answer.status_code == 200 and content(answer.content) and answer.content.endswith(b"data: [DONE]\n\n")
    assert (sim.counters.loads_started, sim.counters.loads_completed, sim.counters.generations_completed) == (1, 1, 1)


async def test_reject_mode_answers_503_with_the_expected_remaining_load_time(client):
    clock = FakeClock()
    model = cold("cold-70b", load_delay_s=40.0)
    async with Simulator(models=[model], clock=clock) as sim, lmgate(sim.url, models={"on_loading": "reject"}) as (url, app):
        # A first load teaches lmgate how long this model takes (LM Studio reports 40 s).
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.post, url + f"/lmgate/models/{model.id}/load")
            await sim.wait_for(lambda c: c.loads_started == 1)
            clock.advance(40.0)
        await client.post(url + f"/lmgate/models/{model.id}/unload")
        refused = await client.post(url + CHAT, json=chat(model.id))
        await sim.wait_for(lambda c: c.loads_started == 2)  # the refusal started the load all the same
        clock.advance(40.0)
        await app.models.registry.wait_for(lambda r: r.state(model.id) == "loaded")
        served = await client.post(url + CHAT, json=chat(model.id))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_loading"
    assert refused.headers["retry-after"] == "40"
    assert served.status_code == 200 and served.headers["x-lmgate-model-state"] == "warm"


@pytest.mark.parametrize("max_loads", [1, 2])
async def test_loads_run_at_most_max_concurrent_loads_at_a_time(client, max_loads):
    clock = FakeClock()
    models = [cold("big-a", load_delay_s=10.0), cold("big-b", load_delay_s=10.0)]
    async with (
        Simulator(models=models, clock=clock) as sim,
        lmgate(sim.url, models={"max_concurrent_loads": max_loads}) as (url, app),
    ):
        async with anyio.create_task_group() as tg:
            for model in models:
                tg.start_soon(partial(client.post, url + CHAT, json=chat(model.id)))
            await app.models.registry.wait_for(lambda r: all(r.state(m.id) == "loading" for m in models))
            await sim.wait_for(lambda c: c.loads_started == max_loads)
            assert sim.counters.loading == max_loads
            clock.advance(10.0)
            await sim.wait_for(lambda c: c.loads_started == 2)
            clock.advance(10.0)
        assert sim.counters.loads_completed == 2 and sim.counters.generations_completed == 2


# --- servers that do not say what is loaded ------------------------------------------------------


async def test_an_upstream_without_model_state_is_passed_through_under_heartbeats(upstream, client):
    release = anyio.Event()

    async def openai_server(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/v1/models":
            listing = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": listing})
        elif scope["path"] == CHAT:
            await release.wait()  # a silent just-in-time load, then the answer
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\ndata: [DONE]\n\n'})
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    upstream.handler = openai_server
    async with lmgate(upstream.url) as (url, app):
        async with client.stream("POST", url + CHAT, json=chat("m", stream=True)) as response:
            chunks = response.aiter_raw()
            first, second = await anext(chunks), await anext(chunks)
            release.set()
            rest = b"".join([chunk async for chunk in chunks])
        again = await client.post(url + CHAT, json=chat("m", stream=True))
    assert first.startswith(b": lmgate waiting model=m") and second.startswith(b": lmgate waiting model=m")
    assert b" x-lmgate-model-state=unknown" in comments(rest)[0] and rest.endswith(b"data: [DONE]\n\n")
    assert response.headers["x-lmgate-model-state"] == "unknown"  # known before the upstream answered
    assert again.headers["x-lmgate-model-state"] == "unknown"
    assert app.models.registry.state("m") == "unknown"
    paths = [scope["path"] for scope, _ in upstream.requests]
    assert paths == ["/api/v1/models", "/api/v0/models", "/v1/models", CHAT, CHAT]  # listed once, then trusted


# --- where the heartbeat layer sits ---------------------------------------------------------------


async def test_heartbeats_cover_the_wait_for_a_concurrency_slot(client):
    model = SimModel(id="busy-7b", loaded=True, tokens_per_second=20.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with (
        Simulator(models=[model]) as sim,
        lmgate(sim.url, concurrency={"limit": 1}) as (url, _),
        client.stream("POST", url + CHAT, json=chat(model.id, stream=True, max_tokens=10)) as first,
    ):
        chunks = first.aiter_raw()
        await anext(chunks)  # the only slot is taken for about half a second
        queued, timeline = await timed_stream(client, url + CHAT, chat(model.id, stream=True, max_tokens=2))
        rest = b"".join([chunk async for chunk in chunks])
    raw = b"".join(chunk for _, chunk in timeline)
    waits = [line for line in comments(raw) if line.startswith(b": lmgate waiting model=busy-7b")]
    assert rest.endswith(b"data: [DONE]\n\n") and raw.endswith(b"data: [DONE]\n\n")
    assert len(waits) >= 3 and queued.headers["x-accel-buffering"] == "no"
    assert queued.headers["x-lmgate-model-state"] == "warm"  # said by the early start too


async def test_retries_stay_possible_while_only_heartbeats_went_out(client):
    model = cold("cold-8b", load_delay_s=0.4)
    async with Simulator(models=[model]) as sim, lmgate(sim.url, retry={"backoff_base_s": 0.01}) as (url, _):
        sim.inject_fault("http_error", status=503, message="busy", model=model.id)
        response = await client.post(url + CHAT, json=chat(model.id, stream=True))
    assert comments(response.content)[0].startswith(b": lmgate loading")  # the stream had started
    assert b"event: error" not in response.content and response.content.endswith(b"data: [DONE]\n\n")
    assert b"x-lmgate-attempts=2" in response.content  # the 503 was retried behind the heartbeats


async def test_heartbeats_neither_count_as_a_first_token_nor_reset_the_deadline(client):
    # LM Studio answers the headers at once, then processes the prompt for 0.8 s in silence;
    # heartbeats flow every 0.1 s, yet the 0.3 s first-token deadline still fires.
    model = SimModel(id="prefill-7b", loaded=True, ttft_base_s=0.8, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model]) as sim, lmgate(sim.url, timeouts={"first_token_s": 0.3}, retry={"enabled": False}) as (url, _):
        response = await client.post(url + CHAT, json=chat(model.id, stream=True))
    (error,) = [e for e in parse_sse(response.content) if e.event == "error"]
    assert error.json()["error"]["code"] == "timeout" and "first-token" in error.json()["error"]["message"]
    assert 2 <= len(comments(response.content)) <= 4


async def test_mounted_without_lifespan_events_the_first_requester_runs_the_load(client):
    # Starlette does not pass lifespan events to a mounted app: no background task group exists,
    # so the request that starts a load runs it (shielded) and the others wait for it.
    model = cold("cold-8b", load_delay_s=0.3)
    async with Simulator(models=[model], settings=SimSettings(duplicate_instance_race=True)) as sim:
        llm = build_app(Config.model_validate({"upstream": {"url": sim.url}, "models": {"heartbeat_s": HEARTBEAT_S}}))
        outer = Starlette(routes=[Mount("/llm", app=llm)])
        try:
            async with serve_in_background(outer) as server:
                answers: list[httpx.Response] = []

                async def first_request() -> None:
                    answers.append(await client.post(server.url + "/llm" + CHAT, json=chat(model.id, stream=True)))

                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(first_request)
        finally:
            await llm.aclose()
    assert not llm.models.loader.in_background
    assert [a.content.endswith(b"data: [DONE]\n\n") for a in answers] == [True] * 3
    assert sim.counters.loads_started == 1 and sim.counters.instances == {model.id: 1}


async def test_the_request_log_says_cold_even_when_heartbeats_started_the_stream(client, caplog):
    # The heartbeat layer sends the 200 before the cold-start layer's headers exist; the log line
    # (emitted further out, by telemetry) must still know the request waited for a load.
    caplog.set_level("INFO", logger="lmgate")
    async with Simulator(models=[cold("cold-8b", load_delay_s=0.5)]) as sim, lmgate(sim.url) as (url, _):
        response, _ = await timed_stream(client, url + CHAT, chat("cold-8b", stream=True))
    assert response.status_code == 200
    (success,) = [r for r in caplog.records if getattr(r, "event", None) == "gen_success"]
    assert success.model_state == "cold"
    assert success.load_ms >= 400
