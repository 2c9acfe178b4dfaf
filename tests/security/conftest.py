"""A gateway in front of the simulator for the bad-input and access-control suites.

The model layer is off here, so ``sim.counters.requests`` counts exactly the requests lmgate
forwarded: a refusal must leave it unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.app import Gateway, build_app
from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, SimSettings, Simulator

MODEL = "qwen2.5-7b-instruct"


@dataclass(frozen=True)
class Running:
    url: str
    app: Gateway


@asynccontextmanager
async def running_gateway(upstream_url: str, env: dict[str, str] | None = None, **sections: Any) -> AsyncIterator[Running]:
    document: dict[str, Any] = {"upstream": {"url": upstream_url}, "models": {"enabled": False}, "retry": {"enabled": False}}
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    app = build_app(Config.model_validate(document), env=env or {})
    try:
        async with serve_in_background(app) as server:
            yield Running(server.url, app)
    finally:
        await app.aclose()


def sim_for(api_token: str | None = None) -> Simulator:
    model = SimModel(id=MODEL, loaded=True, tokens_per_second=float("inf"), ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    return Simulator(models=[model], settings=SimSettings(api_token=api_token))


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with sim_for() as simulator:
        yield simulator


@pytest.fixture
def start_gateway() -> Callable[..., Any]:
    """``async with start_gateway(sim.url, env={...}, auth={...}) as gw``."""
    return running_gateway


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c
