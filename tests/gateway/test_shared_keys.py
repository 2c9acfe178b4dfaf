"""Per-key limits (``auth.per_key_limit``) counted across gateways through a real redis-server.

A client key holding its one slot on gateway A is refused on gateway B (429 ``rate_limited``),
while another key is served there; once A's request ends, B serves the key again.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from gateway.app import serve_gateway
from gateway.config.settings import Config
from gateway.simulator import SimModel, Simulator
from middleware.auth import hash_key

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
CHAT = "/v1/chat/completions"
CLIENT, OTHER = "sk-client-aaaaaaaaaaaa", "sk-client-bbbbbbbbbbbb"


def config(sim_url: str, redis_url: str) -> Config:
    document: dict[str, Any] = {
        "upstream": {"url": sim_url},
        "auth": {"keys": [hash_key(CLIENT), hash_key(OTHER)], "per_key_limit": 1},
        "state": {"redis_url": redis_url},
        "retry": {"enabled": False},
    }
    return Config.model_validate(document)


def chat(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}], **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def released(url: str) -> None:
    """Bounded poll of Redis until no key holds a slot (A gives its slot back after the last byte)."""
    redis = Redis.from_url(url)
    try:
        with anyio.fail_after(5):
            while any([await redis.zcard(key) for key in await redis.keys("{lmgate:slots:@keys:*}:holders")]):
                await anyio.sleep(0.01)
    finally:
        await redis.aclose()


async def test_a_keys_limit_holds_across_gateways(redis_server):
    model = SimModel(id=MODEL, loaded=True, tokens_per_second=20.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with (
        Simulator(models=[model]) as sim,
        serve_gateway(config(sim.url, redis_server.url)) as (a, _),
        serve_gateway(config(sim.url, redis_server.url)) as (b, _),
        httpx.AsyncClient(timeout=10.0, trust_env=False) as client,
    ):
        async with client.stream("POST", a + CHAT, json=chat(stream=True), headers=bearer(CLIENT)) as first:
            chunks = first.aiter_raw()
            await anext(chunks)  # A holds CLIENT's one slot while the stream runs
            second = await client.post(b + CHAT, json=chat(), headers=bearer(CLIENT))
            other = await client.post(b + CHAT, json=chat(), headers=bearer(OTHER))
            assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
            assert int(second.headers["retry-after"]) >= 1
            assert other.status_code == 200
            async for _ in chunks:
                pass
        await released(redis_server.url)
        assert (await client.post(b + CHAT, json=chat(), headers=bearer(CLIENT))).status_code == 200
