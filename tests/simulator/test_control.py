"""The private /__sim/ control API: absent unless enabled, then every action over HTTP."""

from __future__ import annotations

import anyio
import pytest

from gateway.simulator import FakeClock, RealClock, SimModel, Simulator

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def sim(instant_models, clock):
    async with Simulator(models=instant_models, clock=clock, control=True) as sim:
        yield sim


async def test_without_control_the_prefix_is_an_unknown_route(instant_models, clock, client):
    async with Simulator(models=instant_models, clock=clock) as sim:
        response = await client.post(sim.url + "/__sim/clock/advance", json={"seconds": 1})
    assert response.status_code == 200
    assert response.json() == {"error": "Unexpected endpoint or method. (POST /__sim/clock/advance)"}
    assert clock.now() == 0.0


async def test_counters_and_state(sim, client):
    await client.post(sim.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})
    counters = (await client.get(sim.url + "/__sim/counters")).json()
    state = (await client.get(sim.url + "/__sim/state")).json()
    assert counters["requests"] == 1 and counters["generations_completed"] == 1
    assert counters["instances"] == {"alpha": 1}
    assert state["instances"][0]["identifier"] == "alpha" and state["instances"][0]["status"] == "idle"
    assert state["settings"]["jit"] is True and state["now"] == 0.0


async def test_advancing_the_clock_completes_a_load(client):
    clock = FakeClock()
    async with Simulator(models=[SimModel(id="slow", load_delay_s=30.0)], clock=clock, control=True) as sim:
        async with anyio.create_task_group() as tg:
            result = {}

            async def load() -> None:
                result["r"] = await client.post(sim.url + "/__sim/models/load", json={"model": "slow"})

            tg.start_soon(load)
            await sim.wait_for(lambda c: c.loads_started == 1)
            advanced = await client.post(sim.url + "/__sim/clock/advance", json={"seconds": 30})
        assert advanced.json() == {"now": 30.0}
        assert result["r"].json() == {"instance_id": "slow", "load_time_seconds": 30.0}
        unloaded = await client.post(sim.url + "/__sim/models/unload", json={"model": "slow"})
        assert unloaded.json() == {"unloaded": ["slow"]}
        again = await client.post(sim.url + "/__sim/models/unload", json={"model": "slow"})
        assert again.status_code == 404


async def test_advance_needs_a_fake_clock(instant_models, client):
    async with Simulator(models=instant_models, clock=RealClock(), control=True) as sim:
        response = await client.post(sim.url + "/__sim/clock/advance", json={"seconds": 1})
    assert response.status_code == 409


async def test_faults_can_be_injected_listed_and_cleared(sim, client):
    injected = await client.post(sim.url + "/__sim/faults", json={"kind": "http_error", "count": 2, "status": 503})
    assert injected.json()["fault"] == {"kind": "http_error", "count": 2, "model": None, "status": 503, "message": "Internal server error", "shape": "string", "retry_after": None}
    assert (await client.post(sim.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})).status_code == 503
    assert (await client.get(sim.url + "/__sim/faults")).json()["faults"][0]["count"] == 1
    assert (await client.delete(sim.url + "/__sim/faults")).json() == {"faults": []}
    assert (await client.post(sim.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})).status_code == 200
    bad = await client.post(sim.url + "/__sim/faults", json={"kind": "nope"})
    assert bad.status_code == 400 and "unknown fault kind" in bad.json()["error"]


async def test_settings_can_be_read_and_changed(sim, client):
    changed = await client.patch(sim.url + "/__sim/settings", json={"jit": False, "api_token": "t"})
    assert changed.json()["jit"] is False and sim.settings.jit is False and sim.settings.api_token == "t"
    bad = await client.patch(sim.url + "/__sim/settings", json={"jit": "maybe"})
    typo = await client.patch(sim.url + "/__sim/settings", json={"auto_evcit": True})
    assert bad.status_code == 400 and "settings.jit" in bad.json()["error"]
    assert typo.status_code == 400 and "unknown key" in typo.json()["error"]
    assert (await client.get(sim.url + "/__sim/settings")).json()["api_token"] == "t"


async def test_control_errors(sim, client):
    assert (await client.get(sim.url + "/__sim/nothing")).status_code == 404
    assert (await client.post(sim.url + "/__sim/models/load", content=b"[1]")).status_code == 400
    assert (await client.post(sim.url + "/__sim/models/load", json={"model": "nope"})).status_code == 404
    assert (await client.post(sim.url + "/__sim/clock/advance", json={"seconds": -1})).status_code == 400
