"""/healthz, /readyz and /lmgate/health/llm against the LM Studio simulator, over real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import Gateway, serve_gateway
from gateway.config.settings import Config
from gateway.simulator import SimModel, Simulator
from gateway.telemetry.health import readiness

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
EMBED = "text-embedding-nomic-embed-text-v1.5"
BROKEN = "broken-7b"  # not loaded; its load fails when a test injects load_failure
LLM = "/lmgate/health/llm"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    fast = {"tokens_per_second": 2000.0, "ttft_base_s": 0.0, "ttft_per_prompt_token_s": 0.0}
    models = [
        SimModel(id=MODEL, loaded=True, **fast),
        SimModel(id=EMBED, type="embeddings", loaded=True, **fast),
        SimModel(id=BROKEN, load_delay_s=0.01, **fast),
    ]
    async with Simulator(models=models) as simulator:
        yield simulator


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


@asynccontextmanager
async def gateway(
    upstream_url: str, *, sections: dict[str, Any] | None = None, **health: Any
) -> AsyncIterator[tuple[str, Gateway]]:
    document = {"upstream": {"url": upstream_url}, "health": health, **(sections or {})}
    async with serve_gateway(Config.model_validate(document)) as served:
        yield served


async def test_readiness_never_asks_the_upstream(sim, client):
    # It was one GET /lmstudio-greeting per probe TTL: an open route, so anyone could make lmgate
    # send requests upstream. It answers from what lmgate already knows.
    async with gateway(sim.url) as (url, _):
        answers = [await client.get(url + "/readyz") for _ in range(20)]
        alive = await client.get(url + "/healthz")
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"status": "ready"})] * 20
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    assert sim.counters.http_requests == 0


@pytest.mark.parametrize(
    ("known", "status"),
    [
        ({}, "ready"),
        ({"circuit": "closed"}, "ready"),
        ({"circuit": "half_open"}, "ready"),  # traffic must come for the probe to close it
        ({"circuit": "open"}, "circuit_open"),
        ({"unreachable": "connection refused"}, "upstream_unreachable"),
        ({"preloaded": False, "circuit": "open"}, "preloading"),
        ({"draining": True, "preloaded": False}, "draining"),
    ],
)
def test_readiness_from_known_state(known, status):
    answer_status, document = readiness(**{"draining": False, "preloaded": True, "circuit": None, "unreachable": None, **known})
    assert document["status"] == status
    assert answer_status == (200 if status == "ready" else 503)


async def test_readiness_is_503_while_draining_or_preloading(sim, client):
    async with gateway(sim.url) as (url, app):
        app.telemetry.preloaded = False
        preloading = await client.get(url + "/readyz")
        app.drain.start()
        draining = await client.get(url + "/readyz")
    assert (preloading.status_code, preloading.json()) == (503, {"status": "preloading"})
    assert (draining.status_code, draining.json()) == (503, {"status": "draining"})


async def test_readiness_is_503_once_a_model_state_refresh_found_the_upstream_unreachable(client):
    async with gateway("http://127.0.0.1:9", sections={"models": {"refresh_s": 60}}) as (url, _):
        before = await client.get(url + "/readyz")  # nothing known yet: the first requests will tell
        assert (await client.get(url + "/lmgate/models")).json()["refresh_error"]
        unreachable = await client.get(url + "/readyz")
    assert before.status_code == 200
    assert unreachable.status_code == 503 and unreachable.json()["status"] == "upstream_unreachable"
    assert "could not be reached" in unreachable.json()["reason"]


async def test_readiness_is_503_while_the_upstream_circuit_is_open(client):
    sections = {
        "models": {"enabled": False},
        "retry": {"enabled": False},
        "circuit_breaker": {"failure_threshold": 1, "reset_timeout_s": 600},
    }
    async with gateway("http://127.0.0.1:9", sections=sections) as (url, app):
        failed = await client.post(url + "/v1/chat/completions", json={"model": "m", "messages": []})
        assert failed.status_code >= 500
        shed = await client.get(url + "/readyz")
    assert shed.status_code == 503 and shed.json()["status"] == "circuit_open"


async def test_the_llm_check_generates_one_token_and_is_cached(sim, client):
    async with gateway(sim.url, models=[MODEL], llm_check_ttl_s=60) as (url, app):
        finished = anyio.Event()
        app.telemetry.on_request_end.append(lambda record, outcome: finished.set())
        served = await client.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [], "stream": True})
        assert served.status_code == 200
        with anyio.fail_after(5):
            await finished.wait()
        before = sim.counters.generations_started
        first = await client.get(url + LLM)
        second = await client.get(url + LLM)
    assert sim.counters.generations_started == before + 1
    assert first.status_code == 200 and first.json()["status"] == "ok" and not first.json()["cached"]
    assert second.json()["cached"] and second.json()["models"] == first.json()["models"]
    check = first.json()["models"][MODEL]
    assert check["ok"] and check["reason"] is None and check["latency_ms"] >= 0
    rolling = check["rolling"]
    assert rolling["count"] == 1
    assert set(rolling["latency_ms"]) == set(rolling["ttft_ms"]) == {"p50", "p95", "p99"}
    assert rolling["ttft_ms"]["p50"] <= rolling["latency_ms"]["p50"]


async def test_the_llm_check_is_503_with_the_reason_when_a_model_fails(sim, client):
    # LM Studio answers a failed JIT load with a 400 too: that 400 is the model's failure, not the probe's.
    sim.inject_fault("load_failure", model=BROKEN, message="Engine protocol startup was aborted.")
    async with gateway(sim.url, models=[MODEL, BROKEN]) as (url, _):
        answer = await client.get(url + LLM)
    assert answer.status_code == 503
    document = answer.json()
    assert document["status"] == "unhealthy" and document["reason"].startswith(f"{BROKEN}: HTTP 400")
    assert "Failed to load model" in document["reason"]
    assert document["models"][MODEL]["ok"] and document["models"][MODEL]["status"] == "ok"
    assert document["models"][BROKEN]["ok"] is False and document["models"][BROKEN]["status"] == "failed"


async def test_embeddings_traffic_leaves_the_llm_check_unknown_not_unhealthy(sim, client):
    # The check probed the last-used model with a chat request; an embedding model answers that
    # with 400 "not an LLM", and /lmgate/health/llm said 503 after nothing but embeddings traffic.
    async with gateway(sim.url) as (url, app):
        finished = anyio.Event()
        app.telemetry.on_request_end.append(lambda record, outcome: finished.set())
        served = await client.post(url + "/v1/embeddings", json={"model": EMBED, "input": "hello"})
        assert served.status_code == 200
        with anyio.fail_after(5):
            await finished.wait()
        requests = sim.counters.requests
        answer = await client.get(url + LLM)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["status"] == "unknown" and EMBED in document["reason"]
    check = document["models"][EMBED]
    assert (check["status"], check["ok"], check["latency_ms"]) == ("skipped", None, None)
    assert "embedding" in check["reason"] and check["rolling"]["count"] == 1
    assert sim.counters.requests == requests  # the embedding model got no chat request


async def test_an_embedding_model_is_skipped_beside_a_healthy_llm(sim, client):
    async with gateway(sim.url, models=[MODEL, EMBED]) as (url, _):
        answer = await client.get(url + LLM)
    document = answer.json()
    assert answer.status_code == 200 and document["status"] == "ok" and "reason" not in document
    assert document["models"][MODEL]["status"] == "ok" and document["models"][EMBED]["status"] == "skipped"


async def test_a_model_the_upstream_does_not_know_is_skipped_not_unhealthy(sim, client):
    # LM Studio's 400 model_not_found is about the probe's request (a typo in health.models, a
    # deleted model), not about the upstream's health.
    async with gateway(sim.url, models=[MODEL, "missing-model"]) as (url, _):
        answer = await client.get(url + LLM)
    document = answer.json()
    assert answer.status_code == 200 and document["status"] == "ok"
    check = document["models"]["missing-model"]
    assert check["status"] == "skipped" and check["ok"] is None and check["reason"].startswith("HTTP 400")


async def test_without_a_listing_a_not_an_llm_answer_is_skipped_too(upstream, client):
    # An upstream whose listings say nothing about types: the probe's answer decides.
    async def handler(scope, receive, send):
        if scope["path"] != "/v1/chat/completions":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        error = {"error": {"message": f'Model "{EMBED}" is not an LLM.', "type": "invalid_request_error"}}
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(error).encode()})

    upstream.handler = handler
    async with gateway(upstream.url, models=[EMBED]) as (url, _):
        answer = await client.get(url + LLM)
    document = answer.json()
    assert (answer.status_code, document["status"]) == (200, "unknown")
    assert document["models"][EMBED]["status"] == "skipped" and "not an LLM" in document["models"][EMBED]["reason"]


async def test_without_models_or_traffic_there_is_nothing_to_vouch_for(sim, client):
    async with gateway(sim.url) as (url, _):
        answer = await client.get(url + LLM)
    assert answer.status_code == 503 and "health.models" in answer.json()["reason"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", LLM, "/lmgate/openapi.json"])
async def test_lmgates_read_only_routes_answer_other_methods_with_405(sim, client, path):
    # They answered any method with 200 (TRACE /healthz, POST /lmgate/health/llm ran a check);
    # found by the schemathesis run in tests/security/test_openapi.py.
    async with gateway(sim.url, models=[MODEL]) as (url, _):
        for method in ("POST", "PUT", "DELETE", "TRACE"):
            refused = await client.request(method, url + path)
            assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD", (method, refused.text)
            assert refused.json()["error"]["code"] == refused.headers["x-lmgate-error"] == "method_not_allowed"
        assert sim.counters.requests == 0  # a refused POST /lmgate/health/llm generated nothing
        assert (await client.head(url + path)).status_code == 200
