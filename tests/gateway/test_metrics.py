"""GET /metrics after real traffic through the whole gateway to the LM Studio simulator,
parsed with the Prometheus parser and checked value by value."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import build_app
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
