"""Model state: reading LM Studio's listings, the ETA, and the ``/lmgate/models`` routes.

Listing parsers are checked against the documented bodies (research §1.2-1.5) and LM Studio's
"unknown route is HTTP 200 with an error" quirk; the routes run through the whole gateway in front
of the simulator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import Gateway, build_app, serve_gateway
from gateway.config.settings import Config
from gateway.models.clock import MonotonicClock
from gateway.models.registry import UNLISTED_KEPT, ModelRecord, ModelRegistry
from gateway.models.upstream import Listed, ModelFacts, UpstreamModels, _parse_listing
from gateway.server.serving import serve_in_background
from gateway.simulator import FakeClock, SimModel, SimSettings, Simulator

pytestmark = pytest.mark.anyio

V1_LISTING = {
    "models": [
        {"type": "llm", "key": "google/gemma-4-26b-a4b", "size_bytes": 17990911801, "architecture": "gemma4",
         "quantization": {"name": "Q4_K_M", "bits_per_weight": 4}, "format": "gguf",
         "loaded_instances": [{"id": "google/gemma-4-26b-a4b", "config": {"context_length": 4096, "parallel": 4}},
                              {"id": "google/gemma-4-26b-a4b:2", "config": {"context_length": 4096, "parallel": 4}}]},
        {"type": "llm", "key": "deepseek-r1", "loaded_instances": []},
        {"type": "embedding", "key": "text-embedding-nomic-embed-text-v1.5-embedding", "size_bytes": 274290560,
         "loaded_instances": []},
    ]
}
V0_LISTING = {
    "object": "list",
    "data": [
        {"id": "qwen3-8b", "object": "model", "type": "llm", "arch": "qwen3", "compatibility_type": "gguf",
         "quantization": "Q4_K_M", "state": "loaded", "loaded_context_length": 131072},
        {"id": "text-embedding-nomic-embed-text-v1.5", "object": "model", "type": "embeddings", "state": "not-loaded"},
    ],
}
OPENAI_LISTING = {"object": "list", "data": [{"id": "llama-3-8b", "object": "model", "owned_by": "me"}]}
LM_STUDIO_UNKNOWN_ROUTE = {"error": "Unexpected endpoint or method. (GET /api/v1/models)"}


def test_the_v1_listing_gives_loaded_instances_types_and_sizes() -> None:
    gemma, deepseek, nomic = _parse_listing("api/v1", V1_LISTING)  # type: ignore[misc]
    assert gemma == Listed("google/gemma-4-26b-a4b", "llm", True, ("google/gemma-4-26b-a4b", "google/gemma-4-26b-a4b:2"),
                           17990911801, ModelFacts("gemma4", "Q4_K_M", "gguf", 4096))
    assert deepseek.loaded is False and deepseek.instances == ()
    assert deepseek.facts == ModelFacts() and deepseek.facts.model_info() == {}  # not loaded: no context
    assert nomic.is_embedding and nomic.size_bytes == 274290560


def test_the_v0_listing_gives_the_state() -> None:
    qwen, nomic = _parse_listing("api/v0", V0_LISTING)  # type: ignore[misc]
    assert (qwen.loaded, qwen.instances, nomic.loaded, nomic.is_embedding) == (True, ("qwen3-8b",), False, True)
    assert qwen.facts is not None
    assert qwen.facts.model_info() == {"arch": "qwen3", "quant": "Q4_K_M", "format": "gguf", "context_length": 131072}


def test_the_openai_listing_leaves_the_state_unknown() -> None:
    (llama,) = _parse_listing("v1", OPENAI_LISTING)  # type: ignore[misc]
    assert llama == Listed("llama-3-8b") and llama.loaded is None


@pytest.mark.parametrize(
    ("api", "document"),
    [
        ("api/v1", LM_STUDIO_UNKNOWN_ROUTE),  # LM Studio 0.3: /api/v1 is an "unknown route", HTTP 200
        ("api/v0", OPENAI_LISTING),  # an OpenAI listing has no state: not v0
        ("api/v0", LM_STUDIO_UNKNOWN_ROUTE),
        ("v1", ["not", "an", "object"]),
        ("v1", None),
    ],
)
def test_a_body_in_another_shape_is_not_taken_for_the_listing(api: Any, document: Any) -> None:
    assert _parse_listing(api, document) is None


def registry_with(*records: ModelRecord) -> ModelRegistry:
    upstream = UpstreamModels(httpx.AsyncClient(), "http://unused")
    registry = ModelRegistry(upstream, clock=MonotonicClock(), refresh_s=5.0)
    registry.records = {record.id: record for record in records}
    return registry


def test_the_eta_is_the_median_load_else_scaled_by_size_from_other_models() -> None:
    small = ModelRecord("small", listed=Listed("small", size_bytes=4_000_000_000))
    small.durations.extend([9.0, 11.0, 10.0])
    big = ModelRecord("big", listed=Listed("big", size_bytes=40_000_000_000))
    unsized = ModelRecord("unsized", listed=Listed("unsized"))
    registry = registry_with(small, big, unsized)
    assert registry.expected_load_s("small") == 10.0
    assert registry.expected_load_s("big") == pytest.approx(100.0)
    assert registry.expected_load_s("unsized") is None
    assert registry.remaining_load_s("big", elapsed_s=30.2) == 70
    assert registry.remaining_load_s("small", elapsed_s=12.0) == 0  # overdue: "any moment now"


def test_a_loaded_instance_id_counts_as_loaded() -> None:
    record = ModelRecord("m", listed=Listed("m", loaded=True, instances=("m", "m:2")))
    registry = registry_with(record)
    assert registry.find("m:2") is record and registry.state("m:2") == "loaded"
    assert registry.state("other") == "unknown"


# --- the routes ---------------------------------------------------------------------------------


@asynccontextmanager
async def lmgate(sim: Simulator, **models: Any) -> AsyncIterator[tuple[str, Gateway]]:
    async with serve_gateway(Config.model_validate({"upstream": {"url": sim.url}, "models": models})) as served:
        yield served


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


def fast(model_id: str, **extra: Any) -> SimModel:
    return SimModel(id=model_id, tokens_per_second=float("inf"), ttft_base_s=0.0, ttft_per_prompt_token_s=0.0, **extra)


async def test_the_models_route_shows_state_loads_and_use(client):
    models = [fast("warm-7b", loaded=True), fast("cold-8b", load_delay_s=0.2)]
    async with Simulator(models=models) as sim, lmgate(sim, keep_warm=["warm-7b"], ttl_s={"cold-8b": 600}) as (url, _):
        await client.post(url + "/v1/chat/completions", json={"model": "cold-8b", "messages": [{"role": "user", "content": "hi"}]})
        document = (await client.get(url + "/lmgate/models")).json()
        one = (await client.get(url + "/lmgate/models/cold-8b")).json()
        missing = await client.get(url + "/lmgate/models/nope")
    assert document["api"] == "api/v1" and document["ready"] is True and document["refresh_error"] is None
    assert document["loads"] == {"in_progress": [], "max_concurrent": 1, "timeout_s": 300.0}
    cold, warm = document["models"]
    assert cold == one
    assert (cold["id"], cold["state"], cold["instances"], cold["ttl_s"]) == ("cold-8b", "loaded", ["cold-8b"], 600)
    assert cold["loads"]["count"] == 1 and 0.2 <= cold["loads"]["last_s"] < 1 and cold["loads"]["median_s"] == cold["loads"]["last_s"]
    assert cold["in_flight"] == 0 and cold["queued"] == 0 and cold["idle_s"] is not None and cold["load_error"] is None
    assert (warm["id"], warm["state"], warm["keep_warm"], warm["loads"]["count"]) == ("warm-7b", "loaded", True, 0)
    assert missing.status_code == 404


async def test_load_and_unload_routes(client):
    clock = FakeClock()
    async with Simulator(models=[fast("cold-8b", load_delay_s=30.0)], clock=clock) as sim, lmgate(sim) as (url, _):
        async with anyio.create_task_group() as tg:
            loads: list[httpx.Response] = []

            async def load() -> None:
                loads.append(await client.post(url + "/lmgate/models/cold-8b/load"))

            tg.start_soon(load)
            tg.start_soon(load)  # joins the first: one load
            await sim.wait_for(lambda c: c.loads_started == 1)
            loading = (await client.get(url + "/lmgate/models/cold-8b")).json()
            clock.advance(30.0)
        again = await client.post(url + "/lmgate/models/cold-8b/load")
        unloaded = await client.post(url + "/lmgate/models/cold-8b/unload")
        state = (await client.get(url + "/lmgate/models/cold-8b")).json()["state"]
        wrong_method = await client.get(url + "/lmgate/models/cold-8b/load")
    assert loading["state"] == "loading" and loading["loading"]["elapsed_s"] >= 0
    assert sorted(r.json()["status"] for r in loads) == ["loaded", "loaded"]
    assert {r.json()["load_s"] for r in loads} == {30.0}  # LM Studio's own load_time_seconds
    assert again.json()["status"] == "already_loaded" and sim.counters.loads_started == 1
    assert unloaded.json() == {"model": "cold-8b", "unloaded": ["cold-8b"]} and state == "not-loaded"
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


async def test_unloading_a_model_in_use_needs_force(client):
    slow = SimModel(id="slow-7b", loaded=True, tokens_per_second=5.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[slow]) as sim, lmgate(sim) as (url, _):
        body = {"model": "slow-7b", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as streaming:
            chunks = streaming.aiter_raw()
            await anext(chunks)
            refused = await client.post(url + "/lmgate/models/slow-7b/unload")
            forced = await client.post(url + "/lmgate/models/slow-7b/unload?force=true")
            rest = b"".join([chunk async for chunk in chunks])
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_busy"
    assert forced.json()["unloaded"] == ["slow-7b"]
    assert b"event: error" in rest and b"Model unloaded" in rest  # LM Studio fails what it unloads


async def test_readyz_is_503_until_preload_finished(client):
    clock = FakeClock()
    models = [fast("pinned-70b", load_delay_s=60.0), fast("other", loaded=True)]
    async with Simulator(models=models, clock=clock) as sim, lmgate(sim, preload=["pinned-70b"]) as (url, app):
        await sim.wait_for(lambda c: c.loads_started == 1)
        before = await client.get(url + "/readyz")
        warm_meanwhile = await client.post(url + "/v1/chat/completions", json={"model": "other", "messages": []})
        clock.advance(60.0)
        with anyio.fail_after(5):
            await app.models.wait_ready()
        after = await client.get(url + "/readyz")
    assert before.status_code == 503 and before.json() == {"status": "preloading", "models": ["pinned-70b"]}
    assert warm_meanwhile.status_code == 200  # serving does not wait for readiness
    assert after.status_code == 200
    assert sim.counters.instances == {"pinned-70b": 1, "other": 1}


async def test_a_failing_preload_keeps_readyz_at_503_and_is_retried(client):
    clock = FakeClock()
    async with Simulator(models=[fast("pinned", load_delay_s=1.0)], clock=clock) as sim:
        sim.inject_fault("load_failure", message="Model loading was stopped due to insufficient system resources.")
        async with lmgate(sim, preload=["pinned"]) as (url, app):
            await sim.wait_for(lambda c: c.loads_started == 1)
            clock.advance(1.0)
            await app.models.registry.wait_for(lambda r: r.state("pinned") == "failed")
            failed = await client.get(url + "/readyz")
            listing = (await client.get(url + "/lmgate/models")).json()
            clock.advance(1.0)  # lmgate's retry backoff (1 s on its clock)...
            await sim.wait_for(lambda c: c.loads_started == 2)
            clock.advance(1.0)  # ...and the second load's delay
            with anyio.fail_after(5):
                await app.models.wait_ready()
    assert failed.status_code == 503
    assert listing["models"][0]["load_error"] == 'Failed to load model "pinned". Error: Model loading was stopped due to insufficient system resources.'
    assert sim.counters.loads_completed == 1


async def test_failed_loads_of_models_the_upstream_does_not_list_leave_a_bounded_number_of_records(client):
    # Each failed admin load of a model LM Studio does not have used to leave a record forever.
    # The newest UNLISTED_KEPT stay visible with their errors; configured models always stay.
    ghosts = UNLISTED_KEPT + 8
    async with Simulator(models=[fast("real-8b")]) as sim, lmgate(sim, keep_warm=["ghost-kept"]) as (url, app):
        registry = app.models.registry
        await registry.wait_for(lambda r: "ghost-kept" in r.records)  # its keep-warm ping failed
        for n in range(ghosts):
            assert (await client.post(url + f"/lmgate/models/ghost-{n}/load")).status_code == 502
        listing = (await client.get(url + "/lmgate/models")).json()
        newest = (await client.get(url + f"/lmgate/models/ghost-{ghosts - 1}")).json()
        oldest = await client.get(url + "/lmgate/models/ghost-0")
    ids = {m["id"] for m in listing["models"]}
    assert ids == {"real-8b", "ghost-kept", *(f"ghost-{n}" for n in range(ghosts - UNLISTED_KEPT, ghosts))}
    assert newest["state"] == "failed" and newest["load_error"] and oldest.status_code == 404
    assert len(registry.records) == UNLISTED_KEPT + 2


async def test_loads_go_through_the_api_key(client):
    async with Simulator(models=[fast("cold", load_delay_s=0.1)], settings=SimSettings(api_token="sk-lm-test:secret")) as sim:
        app = build_app(Config.model_validate({"upstream": {"url": sim.url, "api_key": "sk-lm-test:secret"}}))
        try:
            async with serve_in_background(app) as server:
                loaded = await client.post(server.url + "/lmgate/models/cold/load")
        finally:
            await app.aclose()
    assert loaded.json()["status"] == "loaded"
