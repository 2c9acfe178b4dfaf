"""Parallel slots per loaded instance, a strict FIFO queue beyond them, and 503 under overload."""

from __future__ import annotations

import anyio
import pytest

from gateway.simulator import FakeClock, SimModel, SimSettings, Simulator
from gateway.simulator.slots import Slots
from gateway.simulator.testing import BackgroundStream

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(stream: bool = True) -> dict:
    return {"model": "alpha", "messages": MESSAGES, "stream": stream}


def alpha(parallel: int) -> SimModel:
    """Two tokens per answer (with completion_tokens=2) at 0 and 0.1 s after the request starts."""
    return SimModel(id="alpha", loaded=True, parallel=parallel, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0, tokens_per_second=10.0)


async def test_requests_beyond_the_slots_wait_their_turn_in_order(clock, client):
    async with Simulator(models=[alpha(parallel=1)], settings=SimSettings(completion_tokens=2), clock=clock) as sim:
        streams = {name: BackgroundStream(client, sim.url + "/v1/chat/completions", chat()) for name in "ABC"}
        async with anyio.create_task_group() as tg:
            tg.start_soon(streams["A"].run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            tg.start_soon(streams["B"].run)
            await sim.wait_for(lambda c: c.queued == 1)
            tg.start_soon(streams["C"].run)
            await sim.wait_for(lambda c: c.queued == 2)
            clock.advance(0.15)  # A ends at 0.1 and hands its slot to B, whose first token is due at once
            await streams["A"].wait_done()
            await streams["B"].wait_frames(1)
            await anyio.wait_all_tasks_blocked()
            assert streams["C"].frames == [] and sim.counters.queued == 1
            clock.advance(0.1)  # B ends at 0.2; C starts
            await streams["B"].wait_done()
            await streams["C"].wait_frames(1)
            clock.advance(1.0)
            await streams["C"].wait_done()
        assert sim.counters.max_active_generations == 1 and sim.counters.generations_completed == 3


async def test_parallel_slots_run_together(clock, client):
    async with Simulator(models=[alpha(parallel=2)], settings=SimSettings(completion_tokens=2), clock=clock) as sim:
        streams = [BackgroundStream(client, sim.url + "/v1/chat/completions", chat()) for _ in range(3)]
        async with anyio.create_task_group() as tg:
            for stream in streams:
                tg.start_soon(stream.run)
            await sim.wait_for(lambda c: c.generations_started == 2 and c.queued == 1)
            clock.advance(1.0)
            for stream in streams:
                await stream.wait_done()
        assert sim.counters.max_active_generations == 2 and sim.state()["instances"][0]["parallel"] == 2


async def test_a_full_queue_is_a_503_before_any_header(clock, client):
    settings = SimSettings(completion_tokens=2, max_queued=1)
    async with Simulator(models=[alpha(parallel=1)], settings=settings, clock=clock) as sim:
        streams = [BackgroundStream(client, sim.url + "/v1/chat/completions", chat()) for _ in range(2)]
        async with anyio.create_task_group() as tg:
            for stream in streams:
                tg.start_soon(stream.run)
            await sim.wait_for(lambda c: c.generations_started == 1 and c.queued == 1)
            async with client.stream("POST", sim.url + "/v1/chat/completions", json=chat()) as response:
                body = await response.aread()
            clock.advance(1.0)
        assert response.status_code == 503
        assert body == b'{"error":"Server busy: too many requests are queued. Please try again later."}'
        assert sim.counters.rejected == 1


async def test_waiting_longer_than_the_queue_timeout_is_a_503(clock, client):
    settings = SimSettings(completion_tokens=50, queue_timeout_s=2.0)
    async with Simulator(models=[alpha(parallel=1)], settings=settings, clock=clock) as sim:
        async with anyio.create_task_group() as tg:
            tg.start_soon(BackgroundStream(client, sim.url + "/v1/chat/completions", chat()).run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            result = {}

            async def queued() -> None:
                result["r"] = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))

            tg.start_soon(queued)
            await sim.wait_for(lambda c: c.queued == 1)
            clock.advance(2.0)
            await sim.wait_for(lambda c: c.rejected == 1)
            clock.advance(10.0)
        assert result["r"].status_code == 503


async def test_a_slot_granted_to_a_waiter_that_is_cancelled_passes_to_the_next():
    clock = FakeClock()
    slots = Slots(1)
    assert slots.try_take()
    order: list[str] = []
    first_scope = anyio.CancelScope()

    async def first() -> None:
        with first_scope:
            await slots.take(clock, 0.0, None)
            order.append("first")

    async def second() -> None:
        at = await slots.take(clock, 0.0, None)
        order.append(f"second@{at}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        first_scope.cancel()  # the first waiter is being cancelled (its client left)...
        slots.release(3.0)  # ...when the slot is granted to it, before it could run
    assert order == ["second@3.0"] and slots.busy == 1 and slots.queued == 0


async def test_max_queued_zero_means_no_queue_at_all(clock, client):
    settings = SimSettings(completion_tokens=2, max_queued=0)
    async with Simulator(models=[alpha(parallel=1)], settings=settings, clock=clock) as sim:
        async with anyio.create_task_group() as tg:
            tg.start_soon(BackgroundStream(client, sim.url + "/v1/chat/completions", chat()).run)
            await sim.wait_for(lambda c: c.generations_started == 1)
            refused = await client.post(sim.url + "/v1/chat/completions", json=chat(stream=False))
            clock.advance(1.0)
        assert refused.status_code == 503 and sim.counters.queued == 0
