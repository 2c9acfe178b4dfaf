"""Warm models stay warm: idle TTL expiry in the simulator, and keep-warm over a simulated day.

The model service and the simulator share one ``FakeClock``, so a day passes in 48 steps of half an
hour; after each step the test waits for the event it expects (a ping, an unload), never for time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from gateway.config.settings import ModelsConfig
from gateway.models import ModelService
from gateway.simulator import FakeClock, SimModel, Simulator

pytestmark = pytest.mark.anyio

TTL_S = 3600.0  # LM Studio's default idle TTL for JIT loads
DAY_S = 24 * 3600.0
MODEL = SimModel(id="pinned-8b", load_delay_s=0.0, tokens_per_second=float("inf"), ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)


@asynccontextmanager
async def service(sim: Simulator, clock: FakeClock, **options: Any) -> AsyncIterator[ModelService]:
    async with httpx.AsyncClient(trust_env=False) as client:
        models = ModelService(ModelsConfig(**options), client=client, upstream_url=sim.url, clock=clock)
        async with models.running():
            yield models


async def loaded(models: ModelService) -> None:
    """Wait until lmgate itself has seen the load end (the simulator counts it a little earlier)."""
    await models.registry.wait_for(lambda registry: registry.state(MODEL.id) == "loaded")


async def test_the_idle_ttl_unloads_a_model_lmgate_loaded_and_lmgate_notices() -> None:
    clock = FakeClock()
    async with Simulator(models=[MODEL], clock=clock) as sim, service(sim, clock, ttl_s=TTL_S) as models:
        await models.load(MODEL.id)
        assert sim.counters.instances == {MODEL.id: 1}
        clock.advance(TTL_S)
        await sim.wait_for(lambda c: c.ttl_unloads == 1)
        await models.registry.refresh(force=True)
        assert models.registry.state(MODEL.id) == "not-loaded"


async def test_keep_warm_holds_a_model_loaded_through_a_simulated_day() -> None:
    clock = FakeClock()
    async with Simulator(models=[MODEL], clock=clock) as sim, service(sim, clock, keep_warm=[MODEL.id], ttl_s=TTL_S) as models:
        await loaded(models)  # keep-warm loads it at start-up
        steps = int(DAY_S / (TTL_S / 2))
        for step in range(1, steps + 1):
            clock.advance(TTL_S / 2)  # idle for half the TTL: time for a one-token ping
            await models.registry.wait_for(lambda _, step=step: models.warmer.pings == step)
        assert clock.now() == DAY_S
        assert sim.counters.ttl_unloads == 0 and sim.counters.instances == {MODEL.id: 1}
        assert sim.counters.loads_started == 1 and models.warmer.pings == steps == 48


async def test_keep_warm_reloads_a_pinned_model_that_was_unloaded() -> None:
    clock = FakeClock()
    async with Simulator(models=[MODEL], clock=clock) as sim, service(sim, clock, keep_warm=[MODEL.id], refresh_s=5.0) as models:
        await loaded(models)
        await sim.unload_model(MODEL.id)  # `lms unload`, or memory pressure
        clock.advance(5.0)  # keep-warm looks again within refresh_s
        await sim.wait_for(lambda c: c.loads_completed == 2)
        assert sim.counters.instances == {MODEL.id: 1}
