"""What the simulator does when the client leaves, phase by phase (research §3.3), on a FakeClock.

The cancel must be noticed from ``receive()`` at once (the gateway's tests need it within 250 ms of
the client leaving), except where LM Studio itself waits: a prefill under way finishes first, and a
non-streaming request is generated to completion.
"""

from __future__ import annotations

import logging

import anyio
import pytest

from gateway.simulator import RealClock, SimModel, SimSettings, Simulator
from gateway.simulator.http import DISCONNECT_LINE
from gateway.simulator.testing import BackgroundStream

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Hi"}]
NOTICE_WITHIN_S = 0.25


def chat(model: str = "alpha", *, stream: bool = True) -> dict:
    return {"model": model, "messages": MESSAGES, "stream": stream}


def model(id: str = "alpha", **overrides: object) -> SimModel:
    """Loaded, 0.5 s prefill, 10 tokens/s; JIT-loads in 5 s when not loaded."""
    fields = {"loaded": True, "load_delay_s": 5.0, "ttft_base_s": 0.5, "ttft_per_prompt_token_s": 0.0, "tokens_per_second": 10.0}
    return SimModel(id=id, **{**fields, **overrides})  # type: ignore[arg-type]


async def test_leaving_during_generation_stops_it_at_once(clock, client, caplog):
    caplog.set_level(logging.INFO, logger="gateway.simulator")
    async with Simulator(models=[model()], clock=clock) as sim:
        stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat())
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            clock.advance(0.75)  # tokens at 0.5, 0.6, 0.7
            await stream.wait_frames(3)
            stream.hang_up()
            await sim.wait_for(lambda c: c.generations_cancelled == 1)
        counters = sim.counters
        assert counters.tokens_before_cancel == [3]
        assert counters.cancel_times[0] - stream.hung_up_at < NOTICE_WITHIN_S
        assert counters.active_generations == 0 and counters.generations_completed == 0
        assert counters.disconnects == 1
        assert DISCONNECT_LINE in caplog.messages
        assert sim.state()["instances"][0]["busySlots"] == 0  # the slot is free again


async def test_leaving_during_the_prefill_stops_after_the_prefill(clock, client):
    async with Simulator(models=[model(ttft_base_s=2.0)], clock=clock) as sim:
        stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat())
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            stream.hang_up()
            await sim.wait_for(lambda c: c.disconnects == 1)
        await anyio.wait_all_tasks_blocked()
        assert sim.counters.generations_cancelled == 0 and sim.counters.active_generations == 1
        clock.advance(2.0)
        await sim.wait_for(lambda c: c.generations_cancelled == 1)
        assert sim.counters.tokens_before_cancel == [0]
        assert sim.counters.cancel_times[0] - stream.hung_up_at < NOTICE_WITHIN_S  # noticed at once, acted on later


@pytest.mark.parametrize("abort", [False, True])
async def test_leaving_during_a_jit_load_continues_or_aborts_it(clock, client, abort):
    settings = SimSettings(abort_load_on_disconnect=abort)
    async with Simulator(models=[model("beta", loaded=False)], settings=settings, clock=clock) as sim:
        stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("beta"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await sim.wait_for(lambda c: c.loads_started == 1)
            stream.hang_up()
            await sim.wait_for(lambda c: c.disconnects == 1)
        assert sim.counters.disconnect_times[0] - stream.hung_up_at < NOTICE_WITHIN_S
        if abort:
            await sim.wait_for(lambda c: c.loads_aborted == 1)
            assert sim.counters.instances == {} and sim.counters.loading == 0
        else:
            clock.advance(5.0)
            await sim.wait_for(lambda c: c.loads_completed == 1)
            assert sim.counters.instances == {"beta": 1}
        await anyio.wait_all_tasks_blocked()
        assert sim.counters.generations_started == 0


async def test_a_load_is_aborted_only_when_its_last_waiting_client_leaves(clock, client):
    settings = SimSettings(abort_load_on_disconnect=True, completion_tokens=1)
    async with Simulator(models=[model("beta", loaded=False)], settings=settings, clock=clock) as sim:
        leaver = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("beta"))
        stayer = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("beta"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(leaver.run)
            tg.start_soon(stayer.run)
            await sim.wait_for(lambda c: c.requests == 2 and c.loads_started == 1)
            await anyio.wait_all_tasks_blocked()
            leaver.hang_up()
            await sim.wait_for(lambda c: c.disconnects == 1)
            clock.advance(10.0)
            await stayer.wait_done()
        assert stayer.frames[-1].data == "[DONE]"
        assert sim.counters.loads_aborted == 0 and sim.counters.loads_completed == 1


async def test_a_non_streaming_request_is_generated_to_completion_after_its_client_left(clock, client):
    async with Simulator(models=[model()], settings=SimSettings(completion_tokens=5), clock=clock) as sim:
        request = BackgroundStream(client, sim.url + "/v1/chat/completions", chat(stream=False))
        async with anyio.create_task_group() as tg:
            tg.start_soon(request.run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            request.hang_up()
            await sim.wait_for(lambda c: c.disconnects == 1)
        clock.advance(1.0)
        await sim.wait_for(lambda c: c.generations_completed == 1)
        assert sim.counters.generations_cancelled == 0 and sim.counters.tokens_before_cancel == []


async def test_leaving_the_slot_queue_frees_the_place(clock, client):
    settings = SimSettings(completion_tokens=2)
    async with Simulator(models=[model(parallel=1, ttft_base_s=0.0)], settings=settings, clock=clock) as sim:
        running = BackgroundStream(client, sim.url + "/v1/chat/completions", chat())
        waiting = BackgroundStream(client, sim.url + "/v1/chat/completions", chat())
        async with anyio.create_task_group() as tg:
            tg.start_soon(running.run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            tg.start_soon(waiting.run)
            await sim.wait_for(lambda c: c.queued == 1)
            waiting.hang_up()
            await sim.wait_for(lambda c: c.queued == 0)
            clock.advance(1.0)
            await running.wait_done()
        assert sim.counters.generations_started == 1 and sim.counters.generations_cancelled == 0
        assert sim.state()["instances"][0]["busySlots"] == 0


async def test_on_a_real_clock_a_short_stream_runs_in_real_time_and_cancels_promptly(client):
    fast = SimModel(id="live", load_delay_s=0.2, ttft_base_s=0.01, ttft_per_prompt_token_s=0.0, tokens_per_second=200.0)
    slow = SimModel(id="slow", loaded=True, ttft_base_s=0.0, tokens_per_second=20.0)
    async with Simulator(models=[fast, slow], settings=SimSettings(auto_evict=False), clock=RealClock()) as sim:
        async with client.stream("POST", sim.url + "/v1/chat/completions", json=chat("live")) as response:
            raw = await response.aread()
        assert raw.endswith(b"data: [DONE]\n\n") and sim.counters.loads_completed == 1
        stream = BackgroundStream(client, sim.url + "/v1/chat/completions", chat("slow"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await stream.wait_frames(2)
            stream.hang_up()
            await sim.wait_for(lambda c: c.generations_cancelled == 1)
        assert sim.counters.cancel_times[0] - stream.hung_up_at < NOTICE_WITHIN_S
        assert 2 <= sim.counters.tokens_before_cancel[0] < 24


async def test_a_real_clock_can_run_faster_than_real_time(client):
    sleepy = SimModel(id="sleepy", load_delay_s=30.0, ttft_base_s=1.0, tokens_per_second=5.0)
    async with Simulator(models=[sleepy], settings=SimSettings(completion_tokens=5), clock=RealClock(speed=200)) as sim:
        with anyio.fail_after(2.0):  # 32 simulated seconds in about 0.16 real ones
            response = await client.post(sim.url + "/api/v0/chat/completions", json=chat("sleepy", stream=False))
    assert response.status_code == 200 and response.json()["stats"]["time_to_first_token"] == 1.0
