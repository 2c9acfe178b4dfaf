"""GET /metrics after real traffic through the whole gateway to the LM Studio simulator,
parsed with the Prometheus parser and checked value by value."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import build_app, serve_gateway
from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, Simulator

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
CHAT = "/v1/chat/completions"


def chat(model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Count to three."}], **extra}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    model = SimModel(id=MODEL, loaded=True, tokens_per_second=2000.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model]) as simulator:
        yield simulator


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as (name, labels) -> value, from the Prometheus text parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


async def test_metrics_after_real_traffic(sim):
    config = Config.model_validate({"upstream": {"url": sim.url}, "retry": {"backoff_base_s": 0.01}})
    app = build_app(config)
    ended_send, ended = anyio.create_memory_object_stream[object](16)
    app.telemetry.on_request_end.append(lambda record, outcome: ended_send.send_nowait(outcome))
    with ended_send, ended:
        async with serve_in_background(app) as server, httpx.AsyncClient(timeout=10, trust_env=False) as client:
            for _ in range(2):
                async with client.stream("POST", server.url + CHAT, json=chat(stream=True)) as response:
                    assert response.status_code == 200
                    await response.aread()
            usage = (await client.post(server.url + CHAT, json=chat())).json()["usage"]
            assert (await client.post(server.url + CHAT, json=chat("no-such-model"))).status_code in (400, 404)
            sim.inject_fault("http_error", status=503, message="busy")
            retried = await client.post(server.url + CHAT, json=chat())
            assert (retried.status_code, retried.headers["x-lmgate-attempts"]) == (200, "2")
            with anyio.fail_after(5):
                for _ in range(5):
                    await ended.receive()
            scrape = await client.get(server.url + "/metrics")
        await app.aclose()
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    parsed = samples(scrape.text)
    # One upstream: every request carries its name ("default" when unnamed).
    ok = {"gen_ai_operation_name": "chat", "gen_ai_request_model": MODEL, "http_route": CHAT, "upstream": "default"}
    duration = "gen_ai_client_operation_duration_seconds"
    assert value(parsed, duration + "_count", **ok, http_response_status_code="200", error_type="") == 4
    failed = {**ok, "gen_ai_request_model": "no-such-model", "error_type": "model_not_found"}
    counts = [v for (name, labels), v in parsed.items() if name == f"{duration}_count" and failed.items() <= labels]
    assert counts == [1]
    # Buckets reach far past 10 s: local prefill and model loads take minutes.
    assert value(parsed, duration + "_bucket", **ok, http_response_status_code="200", error_type="", le="2621.44") == 4
    assert value(parsed, "gen_ai_server_time_to_first_token_seconds_count", **ok) == 2
    tokens = {"gen_ai_operation_name": "chat", "gen_ai_request_model": MODEL}
    for kind, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        assert value(parsed, "gen_ai_client_token_usage_sum", **tokens, gen_ai_token_type=kind) == 4 * usage[key]
    assert value(parsed, "gen_ai_server_time_per_output_token_seconds_count", **tokens) == 2
    assert value(parsed, "lmgate_output_tokens_per_second_count", gen_ai_request_model=MODEL, upstream="default") == 4
    assert value(parsed, "lmgate_errors_total", error_type="model_not_found", gen_ai_request_model="no-such-model",
                 http_route=CHAT, upstream="default") == 1
    assert value(parsed, "lmgate_retries_total", upstream="default") == 1
    assert value(parsed, "lmgate_upstream_attempts_total", upstream="default") == 6
    assert value(parsed, "lmgate_queue_wait_seconds_count", gen_ai_request_model=MODEL, upstream="default") == 4
    assert value(parsed, "lmgate_requests_in_flight", gen_ai_request_model=MODEL) == 0
    assert value(parsed, "lmgate_circuit_state", circuit="upstream", state="closed", upstream="default") == 1
    assert value(parsed, "lmgate_circuit_state", circuit="upstream", state="open", upstream="default") == 0
    assert value(parsed, "lmgate_concurrency_limit", key="*", upstream="default") == 4
    assert value(parsed, "lmgate_concurrency_in_flight", key="*", upstream="default") == 0
    # Routing series exist only with several upstreams (a router).
    assert not any(name.startswith("lmgate_routing") or name == "lmgate_upstream_reachable" for name, _ in parsed)
    assert value(parsed, "lmgate_draining") == 0
    build = {"version": "0.1.0", "config_hash": config.digest(), "pipeline_version": ""}
    assert value(parsed, "lmgate_build_info", **build) == 1


async def test_openmetrics_on_request_and_no_route_when_disabled(sim):
    on = build_app(Config.model_validate({"upstream": {"url": sim.url}}))
    off = build_app(Config.model_validate({"upstream": {"url": sim.url}, "metrics": {"enabled": False}}))
    accept = {"accept": "application/openmetrics-text; version=1.0.0"}
    served = serve_in_background(on), serve_in_background(off)
    async with served[0] as a, served[1] as b, httpx.AsyncClient(trust_env=False) as client:
        negotiated = await client.get(a.url + "/metrics", headers=accept)
        missing = await client.get(b.url + "/metrics")
    await on.aclose()
    await off.aclose()
    assert negotiated.headers["content-type"].startswith("application/openmetrics-text")
    assert negotiated.text.endswith("# EOF\n")
    assert missing.status_code == 404 and off.telemetry.metrics is None


def fast(model_id: str, **extra: Any) -> SimModel:
    return SimModel(id=model_id, tokens_per_second=2000.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0, **extra)


async def test_metrics_and_logs_name_the_upstream_that_served(caplog: pytest.LogCaptureFixture) -> None:
    """Three simulators: each request is labelled with the upstream the router sent it to (the
    simulators' own counters agree), loads with the upstream that loaded, and the layers' series
    and the router's decisions are per upstream."""
    caplog.set_level("INFO", logger="lmgate")
    sims = (
        Simulator(models=[fast("alpha", loaded=True)]),
        Simulator(models=[fast("beta", loaded=True)]),
        Simulator(models=[fast("gamma", load_delay_s=0.05), fast("beta", load_delay_s=0.05)]),
    )
    async with sims[0] as a, sims[1] as b, sims[2] as c:
        config = Config.model_validate({
            "upstreams": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}, {"name": "c", "url": c.url}],
            "retry": {"max_retries": 1, "backoff_base_s": 0.01},
        })
        async with serve_gateway(config) as (url, app), httpx.AsyncClient(timeout=10, trust_env=False) as client:
            ended_send, ended = anyio.create_memory_object_stream[object](16)
            app.telemetry.on_request_end.append(lambda record, outcome: ended_send.send_nowait(outcome))
            served = []
            for model in ("alpha", "alpha", "beta", "gamma"):
                response = await client.post(url + CHAT, json=chat(model))
                served.append((response.status_code, response.headers["x-lmgate-upstream"]))
            assert served == [(200, "a"), (200, "a"), (200, "b"), (200, "c")]
            b.inject_fault("http_error", count=2, model="beta", status=503, message="busy")
            failed_over = await client.post(url + CHAT, json=chat("beta"))
            assert (failed_over.status_code, failed_over.headers["x-lmgate-upstream"]) == (200, "c")
            unknown = await client.post(url + CHAT, json=chat("no-such-model"))
            assert unknown.status_code == 404
            with ended_send, ended, anyio.fail_after(5):
                for _ in range(6):
                    await ended.receive()
            scrape = await client.get(url + "/metrics")
    assert (a.counters.requests, b.counters.requests, c.counters.requests) == (2, 2, 2)
    parsed = samples(scrape.text)
    duration = "gen_ai_client_operation_duration_seconds_count"
    ok = {"gen_ai_operation_name": "chat", "http_route": CHAT, "http_response_status_code": "200", "error_type": ""}
    assert value(parsed, duration, **ok, gen_ai_request_model="alpha", upstream="a") == 2
    assert value(parsed, duration, **ok, gen_ai_request_model="beta", upstream="b") == 1
    assert value(parsed, duration, **ok, gen_ai_request_model="beta", upstream="c") == 1  # after the failover
    assert value(parsed, duration, **ok, gen_ai_request_model="gamma", upstream="c") == 1
    # Sent nowhere: no upstream lists the model.
    assert value(parsed, "lmgate_errors_total", error_type="model_not_found", gen_ai_request_model="no-such-model",
                 http_route=CHAT, upstream="") == 1
    loads = "lmgate_model_load_duration_seconds_count"
    assert value(parsed, loads, gen_ai_request_model="gamma", outcome="ok", upstream="c") == 1
    assert value(parsed, loads, gen_ai_request_model="beta", outcome="ok", upstream="c") == 1
    assert not [labels for name, labels in parsed.items() if name == loads and ("upstream", "c") not in labels]
    # Each upstream's own layers: with c left to try, b made one attempt (no retry in place) and
    # the router moved the request to c at once.
    assert {name: value(parsed, "lmgate_retries_total", upstream=name) for name in "abc"} == {"a": 0, "b": 0, "c": 0}
    assert {name: value(parsed, "lmgate_upstream_attempts_total", upstream=name) for name in "abc"} == {
        "a": 2, "b": 2, "c": 2
    }
    for name in "abc":
        assert value(parsed, "lmgate_circuit_state", circuit=name, state="closed", upstream=name) == 1
        assert value(parsed, "lmgate_concurrency_limit", key="*", upstream=name) == 4
        assert value(parsed, "lmgate_concurrency_in_flight", key="*", upstream=name) == 0
        assert value(parsed, "lmgate_upstream_reachable", upstream=name) == 1
    # The router: 4 warm choices (b's failed one included), 2 loads (gamma, then beta on c), 1 failover.
    assert value(parsed, "lmgate_routing_decisions_total", rule="warm") == 4
    assert value(parsed, "lmgate_routing_decisions_total", rule="load") == 2
    assert value(parsed, "lmgate_routing_failovers_total") == 1
    # b answered 503 but still has beta loaded: loading it on c as well is a second instance.
    assert value(parsed, "lmgate_routing_second_instances_total") == 1
    # The log lines say the same.
    lines = [(r.model, getattr(r, "upstream", None)) for r in caplog.records if getattr(r, "event", None) == "gen_success"]
    assert lines == [("alpha", "a"), ("alpha", "a"), ("beta", "b"), ("gamma", "c"), ("beta", "c")]
    failed = [r for r in caplog.records if getattr(r, "event", None) == "gen_error"]
    assert [(r.error_code, hasattr(r, "upstream")) for r in failed] == [("model_not_found", False)]
    loaded = [(r.model, r.upstream) for r in caplog.records if getattr(r, "event", None) == "model_load"]
    assert loaded == [("gamma", "c"), ("beta", "c")]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_the_upstream_connections_open_on_the_aiohttp_transport(sim, transport):
    config = Config.model_validate({"upstream": {"url": sim.url, "transport": transport}})
    app = build_app(config)
    async with serve_in_background(app) as server, httpx.AsyncClient(timeout=10, trust_env=False) as client:
        assert (await client.post(server.url + CHAT, json=chat())).status_code == 200
        parsed = samples((await client.get(server.url + "/metrics")).text)
    await app.aclose()
    name = "lmgate_upstream_connections"
    if transport == "httpx":  # httpx's own pool has no public view
        assert not [key for key in parsed if key[0] == name]
        return
    # The answer is read to its end before /metrics is asked: its connection is back in the pool.
    assert value(parsed, name, state="in_use", upstream="default") == 0
    assert value(parsed, name, state="idle", upstream="default") == 1
