"""Every LM Studio route over a real socket: listings, load/unload, greeting, unknown routes,
headers and the auth switch."""

from __future__ import annotations

import anyio
import httpx
import pytest

from gateway.simulator import FakeClock, SimModel, SimSettings, Simulator

pytestmark = pytest.mark.anyio

CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "Hello"}]}


async def test_v1_models_lists_downloaded_models_when_jit_is_on(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        response = await client.get(sim.url + "/v1/models")
    assert response.status_code == 200
    assert response.content == (
        b'{"data":[{"id":"alpha","object":"model","owned_by":"organization_owner"},'
        b'{"id":"beta","object":"model","owned_by":"organization_owner"},'
        b'{"id":"embed","object":"model","owned_by":"organization_owner"}],"object":"list"}'
    )


async def test_v1_models_lists_only_loaded_instances_when_jit_is_off(instant_models, clock, client):
    async with Simulator(models=instant_models, settings=SimSettings(jit=False), clock=clock) as sim:
        response = await client.get(sim.url + "/v1/models")
    assert [m["id"] for m in response.json()["data"]] == ["alpha"]


async def test_api_v0_models_reports_state_and_context_lengths(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        listing = (await client.get(sim.url + "/api/v0/models")).json()
        one = (await client.get(sim.url + "/api/v0/models/beta")).json()
        missing = await client.get(sim.url + "/api/v0/models/nope")
    alpha, beta, embed = listing["data"]
    assert listing["object"] == "list"
    assert alpha == {
        "id": "alpha",
        "object": "model",
        "type": "llm",
        "publisher": "lmstudio-community",
        "arch": "llama",
        "compatibility_type": "gguf",
        "quantization": "Q4_K_M",
        "state": "loaded",
        "max_context_length": 32768,
        "loaded_context_length": 4096,
        "capabilities": ["tool_use"],
    }
    assert beta["state"] == "not-loaded" and "loaded_context_length" not in beta
    assert embed["type"] == "embeddings" and "capabilities" not in embed
    assert one == beta
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_api_v1_models_lists_loaded_instances_with_their_config(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        models = (await client.get(sim.url + "/api/v1/models")).json()["models"]
    alpha, beta, embed = models
    assert alpha["key"] == "alpha" and alpha["type"] == "llm"
    assert alpha["loaded_instances"] == [
        {
            "id": "alpha",
            "config": {
                "context_length": 4096,
                "eval_batch_size": 512,
                "parallel": 4,
                "flash_attention": True,
                "offload_kv_cache_to_gpu": True,
            },
        }
    ]
    assert beta["loaded_instances"] == [] and beta["max_context_length"] == 131072
    assert embed["type"] == "embedding"  # v1 spells it in the singular


async def test_rest_load_blocks_for_the_load_delay_then_reports_the_instance(client):
    clock = FakeClock()
    async with Simulator(models=[SimModel(id="beta", load_delay_s=7.5)], clock=clock) as sim:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as other:
            result: dict[str, httpx.Response] = {}

            async def load() -> None:
                result["r"] = await other.post(
                    sim.url + "/api/v1/models/load", json={"model": "beta", "echo_load_config": True}
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                await sim.wait_for(lambda c: c.loads_started == 1)
                assert "r" not in result
                clock.advance(7.5)
        response = result["r"]
        listed = (await client.get(sim.url + "/api/v0/models/beta")).json()
    assert response.status_code == 200
    assert response.json() == {
        "type": "llm",
        "instance_id": "beta",
        "load_time_seconds": 7.5,
        "status": "loaded",
        "load_config": {"context_length": 4096, "eval_batch_size": 512, "flash_attention": True, "offload_kv_cache_to_gpu": True},
    }
    assert listed["state"] == "loaded"


async def test_rest_load_of_a_loaded_model_adds_an_instance_and_unload_removes_it(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        loaded = (await client.post(sim.url + "/api/v1/models/load", json={"model": "alpha"})).json()
        assert loaded["instance_id"] == "alpha:2"
        assert sim.counters.instances == {"alpha": 2}
        unloaded = await client.post(sim.url + "/api/v1/models/unload", json={"instance_id": "alpha:2"})
        missing = await client.post(sim.url + "/api/v1/models/unload", json={"instance_id": "alpha:9"})
        unknown = await client.post(sim.url + "/api/v1/models/load", json={"model": "nope"})
        no_model = await client.post(sim.url + "/api/v1/models/load", json={})
    assert unloaded.json() == {"instance_id": "alpha:2"}
    assert sim.counters.instances == {"alpha": 1}
    assert missing.status_code == 404
    assert unknown.status_code == 404
    assert no_model.status_code == 400
    assert no_model.json()["error"]["code"] == "missing_required_parameter"


async def test_greeting_answers_the_sdk_probe(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        response = await client.get(sim.url + "/lmstudio-greeting")
    assert response.status_code == 200
    assert response.content == b'{"lmstudio":true}'


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health"), ("POST", "/v1/models/unload"), ("GET", "/v1/chat/completions"), ("GET", "/api/tags"), ("GET", "/__sim/counters")],
)
async def test_an_unknown_route_is_http_200_with_an_error_body(instant_models, clock, client, method, path):
    async with Simulator(models=instant_models, clock=clock) as sim:
        response = await client.request(method, sim.url + path)
    assert response.status_code == 200
    assert response.content == b'{"error":"Unexpected endpoint or method. (%s %s)"}' % (method.encode(), path.encode())


async def test_json_responses_carry_express_headers(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        response = await client.get(sim.url + "/v1/models")
    assert response.headers["x-powered-by"] == "Express"
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["etag"].startswith('W/"')


async def test_a_stream_carries_sse_headers_without_x_accel_buffering(instant_models, clock, client):
    async with (
        Simulator(models=instant_models, clock=clock) as sim,
        client.stream("POST", sim.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        await response.aread()
    headers = response.headers
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["connection"] == "keep-alive"
    assert headers["x-powered-by"] == "Express"
    assert headers["transfer-encoding"] == "chunked"
    assert "x-accel-buffering" not in headers


async def test_cors_preflight_is_answered(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        response = await client.options(sim.url + "/v1/chat/completions")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"


async def test_a_body_that_is_not_json_is_a_400(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        response = await client.post(sim.url + "/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert "Invalid JSON" in response.json()["error"]["message"]


class TestAuth:
    @pytest.fixture
    async def sim(self, instant_models, clock):
        async with Simulator(models=instant_models, settings=SimSettings(api_token="sk-lm-abc:def"), clock=clock) as sim:
            yield sim

    async def test_a_missing_token_is_a_401_invalid_api_key(self, sim, client):
        response = await client.post(sim.url + "/v1/chat/completions", json=CHAT)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "invalid_request" and error["code"] == "invalid_api_key"
        assert error["message"].startswith("An LM Studio API token is required")

    async def test_a_wrong_token_is_a_401_too(self, sim, client):
        response = await client.get(sim.url + "/v1/models", headers={"authorization": "Bearer nope"})
        assert response.status_code == 401
        assert response.json()["error"]["message"].startswith("Malformed LM Studio API token")

    async def test_the_right_token_passes(self, sim, client):
        response = await client.post(sim.url + "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-lm-abc:def"})
        assert response.status_code == 200

    async def test_messages_also_accepts_x_api_key(self, sim, client):
        body = {"model": "alpha", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        response = await client.post(sim.url + "/v1/messages", json=body, headers={"x-api-key": "sk-lm-abc:def"})
        assert response.status_code == 200

    async def test_the_greeting_and_unknown_routes_need_no_token(self, sim, client):
        assert (await client.get(sim.url + "/lmstudio-greeting")).status_code == 200
        assert (await client.get(sim.url + "/health")).status_code == 200

    async def test_auth_can_be_switched_off_at_run_time(self, sim, client):
        sim.settings.api_token = None
        assert (await client.post(sim.url + "/v1/chat/completions", json=CHAT)).status_code == 200


async def test_requests_counts_inference_and_routes_counts_everything(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        await client.get(sim.url + "/v1/models")
        await client.get(sim.url + "/health")
        await client.post(sim.url + "/v1/chat/completions", json=CHAT)
        await client.post(sim.url + "/v1/embeddings", json={"model": "embed", "input": "x"})
    counters = sim.counters
    assert (counters.requests, counters.http_requests) == (2, 4)
    assert counters.routes == {"GET /v1/models": 1, "GET /health": 1, "POST /v1/chat/completions": 1, "POST /v1/embeddings": 1}


async def test_a_body_arriving_in_several_segments_is_read_whole(instant_models, clock):
    # A body larger than a segment, or sent by a client in another process, reaches the server in
    # pieces; the simulator once let its disconnect watcher take a piece, and the request hung.
    body = b'{"model": "alpha", "messages": [{"role": "user", "content": "Hello"}]}'
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    async with Simulator(models=instant_models, clock=clock) as sim:
        host, port = sim.url.removeprefix("http://").rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as stream:
            for piece in (head, body[:20], body[20:]):
                await stream.send(piece)
                await anyio.sleep(0.05)  # not a synchronisation: the gap that makes separate segments
            received = b""
            with anyio.fail_after(5):
                while b'"finish_reason":"stop"' not in received:
                    received += await stream.receive()
    assert received.startswith(b"HTTP/1.1 200")
    assert sim.counters.requests == 1
