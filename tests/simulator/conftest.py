"""Fixtures for the simulator's tests: an httpx client and a standing-still clock.

Tests drive the simulator over real sockets (hypercorn on a free 127.0.0.1 port). Time is a
FakeClock unless a test says otherwise, so nothing waits on the wall clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.simulator import FakeClock, SimModel

INSTANT = {"load_delay_s": 0.0, "ttft_base_s": 0.0, "ttft_per_prompt_token_s": 0.0, "tokens_per_second": float("inf")}


@pytest.fixture
def instant() -> dict[str, float]:
    """SimModel keyword arguments for no simulated delay at all (answers at once on a FakeClock)."""
    return dict(INSTANT)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as c:
        yield c


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def instant_models() -> list[SimModel]:
    """A loaded llm, a not-loaded llm and an embeddings model, all without delays."""
    return [
        SimModel(id="alpha", loaded=True, **INSTANT),
        SimModel(id="beta", max_context_length=131072, **INSTANT),
        SimModel(id="embed", type="embeddings", max_context_length=2048, **INSTANT),
    ]
