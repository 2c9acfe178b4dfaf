"""The model lifecycle on a FakeClock: silent JIT loads, idle TTL, Auto-Evict, the duplicate-instance
race, load failures and hangs, JIT off. Nothing here sleeps: time moves only by clock.advance."""

from __future__ import annotations

from functools import partial

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager

from gateway.simulator import FakeClock, SimModel, SimSettings, Simulator
from gateway.simulator.testing import ASGICall, BackgroundStream

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Hi"}]  # one prompt token


def chat(model: str, **extra: object) -> dict:
    return {"model": model, "messages": MESSAGES, "stream": True, **extra}


def llm(id: str, **overrides: object) -> SimModel:
    """A model that loads in 5 s, answers after a 0.5 s prefill and then at 10 tokens/s."""
    fields = {"load_delay_s": 5.0, "ttft_base_s": 0.5, "ttft_per_prompt_token_s": 0.0, "tokens_per_second": 10.0}
    return SimModel(id=id, **{**fields, **overrides})  # type: ignore[arg-type]


async def test_a_jit_stream_sends_headers_then_nothing_until_the_first_token(clock):
    """In process, so "nothing was sent" is exact: the app's messages are recorded one by one."""
    async with Simulator(models=[llm("beta")], settings=SimSettings(completion_tokens=2), clock=clock, serve=False) as sim:
        call = ASGICall(sim.app, "POST", "/v1/chat/completions", chat("beta"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(call.call)
            await sim.wait_for(lambda c: c.loads_started == 1)
            await anyio.wait_all_tasks_blocked()
            assert [m["type"] for m in call.messages] == ["http.response.start"]
            assert call.messages[0]["status"] == 200
            clock.advance(5.0)  # the load completes; the prefill starts
            await sim.wait_for(lambda c: c.generations_started == 1)
            await anyio.wait_all_tasks_blocked()
            assert len(call.messages) == 1
            clock.advance(0.5)  # the first token is due
            await anyio.wait_all_tasks_blocked()
            assert len(call.messages) == 2
            first = call.messages[1]
            assert first["more_body"] is True and first["body"].startswith(b'data: {"id":"chatcmpl-')
            assert b'"delta":{"role":"assistant","content":' in first["body"]
            clock.advance(10.0)
        assert call.body_bytes.endswith(b"data: [DONE]\n\n")
        assert all(m["body"].count(b"\n\n") == 1 for m in call.messages[1:-1])  # one frame per message


async def test_over_a_socket_the_200_arrives_while_the_model_is_still_loading(clock, client):
    async with Simulator(models=[llm("beta")], settings=SimSettings(completion_tokens=2), clock=clock) as sim:
        stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("beta"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await stream.started.wait()
            assert stream.status == 200 and sim.counters.loading == 1 and stream.raw == b""
            clock.advance(5.5)
            frames = await stream.wait_frames(1)
            assert stream.raw.startswith(b"data: {")  # no comment or keep-alive came first
            assert frames[0].json()["choices"][0]["delta"]["role"] == "assistant"
            clock.advance(1.0)
            await stream.wait_done()
        assert stream.frames[-1].data == "[DONE]"


async def test_time_to_first_token_grows_with_the_prompt(clock, client):
    model = llm("alpha", loaded=True, ttft_base_s=0.1, ttft_per_prompt_token_s=0.01)
    async with Simulator(models=[model], settings=SimSettings(completion_tokens=1), clock=clock) as sim:
        long_prompt = {"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "x" * 400}]}
        stream = BackgroundStream(client, sim.url + "/v1/chat/completions", long_prompt)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            clock.advance(1.09)  # 0.1 + 100 tokens x 0.01 = 1.1 s
            await anyio.wait_all_tasks_blocked()
            assert stream.frames == []
            clock.advance(0.01)
            await stream.wait_frames(1)


class TestIdleTTL:
    async def test_a_jit_model_unloads_after_the_request_ttl(self, clock, client):
        async with Simulator(models=[llm("beta", **_instant_answers())], clock=clock) as sim:
            await _jit_load(sim, client, clock, ttl=60)
            clock.advance(59.0)
            await anyio.wait_all_tasks_blocked()
            assert sim.counters.ttl_unloads == 0 and sim.counters.instances == {"beta": 1}
            clock.advance(1.0)
            await sim.wait_for(lambda c: c.ttl_unloads == 1)
            assert sim.counters.instances == {}
            listed = (await client.get(sim.url + "/api/v0/models/beta")).json()
            assert listed["state"] == "not-loaded"

    async def test_without_ttl_the_default_is_an_hour(self, clock, client):
        async with Simulator(models=[llm("beta", **_instant_answers())], clock=clock) as sim:
            await _jit_load(sim, client, clock, ttl=None)
            clock.advance(3599.0)
            await anyio.wait_all_tasks_blocked()
            assert sim.counters.ttl_unloads == 0
            clock.advance(1.0)
            await sim.wait_for(lambda c: c.ttl_unloads == 1)

    async def test_each_request_resets_the_idle_timer_and_a_later_ttl_is_ignored(self, clock, client):
        async with Simulator(models=[llm("beta", **_instant_answers())], clock=clock) as sim:
            await _jit_load(sim, client, clock, ttl=60)
            clock.advance(30.0)
            body = {"model": "beta", "messages": MESSAGES, "ttl": 5}
            assert (await client.post(sim.url + "/v1/chat/completions", json=body)).status_code == 200
            clock.advance(59.0)  # 89 s after loading, 59 s idle: still loaded despite ttl=5 above
            await anyio.wait_all_tasks_blocked()
            assert sim.counters.ttl_unloads == 0
            clock.advance(1.0)
            await sim.wait_for(lambda c: c.ttl_unloads == 1)

    async def test_a_busy_model_is_not_unloaded_and_the_timer_restarts_when_it_goes_idle(self, clock, client):
        model = llm("beta", load_delay_s=0.0, ttft_base_s=0.0, tokens_per_second=1.0)
        async with Simulator(models=[model], settings=SimSettings(completion_tokens=5), clock=clock) as sim:
            stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("beta", ttl=2))
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream.run)
                await stream.wait_frames(1)  # token 0 at t=0; tokens 1..4 at t=1..4
                clock.advance(3.0)
                await stream.wait_frames(4)
                assert sim.counters.ttl_unloads == 0
                clock.advance(1.0)
                await stream.wait_done()
            clock.advance(1.9)
            await anyio.wait_all_tasks_blocked()
            assert sim.counters.ttl_unloads == 0
            clock.advance(0.1)
            await sim.wait_for(lambda c: c.ttl_unloads == 1)

    async def test_an_out_of_band_load_never_expires(self, clock, client):
        async with Simulator(models=[llm("beta", load_delay_s=0.0)], clock=clock) as sim:
            assert await sim.load_model("beta") == "beta"
            clock.advance(10**7)
            await anyio.wait_all_tasks_blocked()
            assert sim.counters.instances == {"beta": 1}


def _instant_answers() -> dict:
    return {"ttft_base_s": 0.0, "tokens_per_second": float("inf")}


async def _jit_load(sim: Simulator, client, clock: FakeClock, *, ttl: int | None) -> None:
    body = {"model": "beta", "messages": MESSAGES, **({"ttl": ttl} if ttl else {})}
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(client.post, sim.url + "/v1/chat/completions", json=body))
        await sim.wait_for(lambda c: c.loads_started == 1)
        clock.advance(5.0)
        await sim.wait_for(lambda c: c.generations_completed == 1)


class TestAutoEvict:
    async def test_loading_another_jit_model_kills_the_in_flight_stream(self, clock, client):
        models = [llm("alpha", load_delay_s=0.0), llm("beta", load_delay_s=0.0)]
        async with Simulator(models=models, clock=clock) as sim:
            victim = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("alpha"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(victim.run)
                await sim.wait_for(lambda c: c.generations_started == 1)
                clock.advance(0.5)
                await victim.wait_frames(1)
                newcomer = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("beta"))
                tg.start_soon(newcomer.run)
                await victim.wait_done()
                clock.advance(100.0)
                await newcomer.wait_done()
            assert victim.frames[-1].raw == b'event: error\ndata: {"error":"Model unloaded."}'
            assert newcomer.frames[-1].data == "[DONE]"
            assert sim.counters.evictions == 1 and sim.counters.generations_killed == 1
            assert sim.counters.instances == {"beta": 1}

    async def test_a_non_streaming_request_on_an_evicted_model_gets_a_400(self, clock, client):
        models = [llm("alpha", load_delay_s=0.0), llm("beta", load_delay_s=0.0)]
        async with Simulator(models=models, clock=clock) as sim:
            async with anyio.create_task_group() as tg:
                result = {}

                async def victim() -> None:
                    result["r"] = await client.post(sim.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})

                tg.start_soon(victim)
                await sim.wait_for(lambda c: c.generations_started == 1)
                tg.start_soon(partial(client.post, sim.url + "/v1/chat/completions", json={"model": "beta", "messages": MESSAGES}))
                await sim.wait_for(lambda c: c.evictions == 1)
                clock.advance(100.0)
            assert result["r"].status_code == 400
            assert result["r"].json() == {"error": "Model unloaded."}

    async def test_models_loaded_out_of_band_are_not_evicted(self, clock, client, instant):
        models = [SimModel(id="alpha", loaded=True, **instant), SimModel(id="beta", **instant)]
        async with Simulator(models=models, clock=clock) as sim:
            await client.post(sim.url + "/v1/chat/completions", json={"model": "beta", "messages": MESSAGES})
            assert sim.counters.instances == {"alpha": 1, "beta": 1} and sim.counters.evictions == 0

    async def test_with_auto_evict_off_jit_models_stay_loaded(self, clock, client, instant):
        models = [SimModel(id="alpha", **instant), SimModel(id="beta", **instant)]
        async with Simulator(models=models, settings=SimSettings(auto_evict=False), clock=clock) as sim:
            for name in ("alpha", "beta"):
                await client.post(sim.url + "/v1/chat/completions", json={"model": name, "messages": MESSAGES})
            assert sim.counters.instances == {"alpha": 1, "beta": 1} and sim.counters.evictions == 0


class TestConcurrentFirstRequests:
    @pytest.mark.parametrize(("race", "instances"), [(False, ["beta"]), (True, ["beta", "beta:2", "beta:3"])])
    async def test_the_duplicate_instance_race_switch(self, clock, client, race, instances):
        settings = SimSettings(duplicate_instance_race=race, completion_tokens=1)
        async with Simulator(models=[llm("beta")], settings=settings, clock=clock) as sim:
            streams = [BackgroundStream(client, sim.url + "/v1/chat/completions", chat("beta")) for _ in range(3)]
            async with anyio.create_task_group() as tg:
                for stream in streams:
                    tg.start_soon(stream.run)
                await sim.wait_for(lambda c: c.requests == 3)
                await anyio.wait_all_tasks_blocked()
                clock.advance(6.0)
                for stream in streams:
                    await stream.wait_done()
            assert all(s.frames[-1].data == "[DONE]" for s in streams)
            assert sim.counters.loads_started == len(instances)
            listed = (await client.get(sim.url + "/api/v1/models")).json()["models"][0]["loaded_instances"]
            assert [i["id"] for i in listed] == instances
            assert sim.counters.instances == {"beta": len(instances)}

    async def test_a_duplicate_instance_can_be_addressed_by_its_id(self, clock, client, instant):
        async with Simulator(models=[SimModel(id="beta", loaded=True, **instant)], clock=clock) as sim:
            assert await sim.load_model("beta") == "beta:2"
            body = (await client.post(sim.url + "/v1/chat/completions", json={"model": "beta:2", "messages": MESSAGES})).json()
            assert body["model"] == "beta"


class TestLoadFaults:
    async def test_a_failed_jit_load_is_a_400_before_headers(self, clock, client, instant):
        async with Simulator(models=[SimModel(id="beta", **instant)], clock=clock) as sim:
            sim.inject_fault("load_failure", message="Operation canceled.")
            response = await client.post(sim.url + "/v1/chat/completions", json={"model": "beta", "messages": MESSAGES})
        assert response.status_code == 400
        assert response.json() == {
            "error": {
                "message": 'Failed to load model "beta". Error: Operation canceled.',
                "type": "invalid_request_error",
                "param": "model",
                "code": None,
            }
        }
        assert sim.counters.loads_failed == 1 and sim.counters.instances == {}

    async def test_a_failed_jit_load_on_a_stream_is_an_error_event_after_the_200(self, clock, client, instant):
        async with Simulator(models=[SimModel(id="beta", **instant)], clock=clock) as sim:
            sim.inject_fault("load_failure")
            async with client.stream("POST", sim.url + "/v1/chat/completions", json=chat("beta")) as response:
                raw = await response.aread()
        assert response.status_code == 200
        assert raw.startswith(b'event: error\ndata: {"error":{"message":"Failed to load model \\"beta\\". Error: ')
        assert b"[DONE]" not in raw

    async def test_a_hung_load_waits_until_unloaded(self, clock, client):
        async with Simulator(models=[llm("beta")], clock=clock) as sim:
            sim.inject_fault("load_hang")
            stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("beta"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream.run)
                await sim.wait_for(lambda c: c.loads_started == 1)
                clock.advance(10**6)
                await anyio.wait_all_tasks_blocked()
                assert sim.counters.loading == 1 and stream.raw == b""
                assert await sim.unload_model("beta") == ["beta"]
                await stream.wait_done()
            assert b"Operation canceled." in stream.raw
            assert sim.counters.loads_aborted == 1

    async def test_rest_load_failure(self, clock, client, instant):
        async with Simulator(models=[SimModel(id="beta", **instant)], clock=clock) as sim:
            sim.inject_fault("load_failure", model="beta", message="Insufficient resources")
            response = await client.post(sim.url + "/api/v1/models/load", json={"model": "beta"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "model_load_failed"
        assert "Insufficient resources" in response.json()["error"]["message"]


class TestJitOff:
    async def test_nothing_loaded_is_no_models_loaded(self, clock, client, instant):
        async with Simulator(models=[SimModel(id="beta", **instant)], settings=SimSettings(jit=False), clock=clock) as sim:
            response = await client.post(sim.url + "/v1/chat/completions", json={"model": "beta", "messages": MESSAGES})
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith("No models loaded. Please load a model")

    async def test_another_model_loaded_is_model_not_found_unless_the_fallback_quirk_is_on(self, clock, client, instant):
        models = [SimModel(id="alpha", loaded=True, **instant), SimModel(id="beta", **instant)]
        async with Simulator(models=models, settings=SimSettings(jit=False), clock=clock) as sim:
            refused = await client.post(sim.url + "/v1/chat/completions", json={"model": "beta", "messages": MESSAGES})
            sim.settings.single_model_fallback = True
            served = await client.post(sim.url + "/v1/chat/completions", json={"model": "beta", "messages": MESSAGES})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_found"
        assert 'valid downloaded model (e.g., alpha)' in refused.json()["error"]["message"]
        assert served.status_code == 200 and served.json()["model"] == "alpha"

    async def test_an_out_of_band_load_makes_it_servable(self, clock, client):
        async with Simulator(models=[llm("beta", ttft_base_s=0.0, tokens_per_second=float("inf"))], settings=SimSettings(jit=False), clock=clock) as sim:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sim.load_model, "beta")
                await sim.wait_for(lambda c: c.loads_started == 1)
                clock.advance(5.0)
            response = await client.post(sim.url + "/v1/chat/completions", json={"model": "beta", "messages": MESSAGES})
        assert response.status_code == 200


async def test_unloading_out_of_band_fails_the_request_in_flight(clock, client):
    async with Simulator(models=[llm("alpha", loaded=True)], clock=clock) as sim:
        stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("alpha"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            clock.advance(0.5)
            await stream.wait_frames(1)
            await sim.unload_model("alpha")
            await stream.wait_done()
        assert stream.frames[-1].raw == b'event: error\ndata: {"error":"Model unloaded."}'
        assert sim.counters.unloads == 1 and sim.counters.generations_killed == 1


async def test_a_model_with_jit_off_must_be_loaded_first(clock, client, instant):
    models = [SimModel(id="manual", jit=False, **instant), SimModel(id="auto", **instant)]
    async with Simulator(models=models, clock=clock) as sim:
        refused = await client.post(sim.url + "/v1/chat/completions", json={"model": "manual", "messages": MESSAGES})
        await sim.load_model("manual")
        served = await client.post(sim.url + "/v1/chat/completions", json={"model": "manual", "messages": MESSAGES})
    assert refused.status_code == 400 and "No models loaded" in refused.json()["error"]["message"]
    assert served.status_code == 200


async def test_the_app_runs_under_any_asgi_server_through_its_lifespan(instant):
    """``sim.app`` without ``async with sim``: the ASGI lifespan starts the simulator's tasks."""
    sim = Simulator(models=[SimModel(id="beta", **instant)], clock=FakeClock())
    async with LifespanManager(sim.app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            response = await client.post("/v1/chat/completions", json={"model": "beta", "messages": MESSAGES})
    assert response.status_code == 200 and sim.counters.loads_completed == 1
