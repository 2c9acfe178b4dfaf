"""The examples in docs/examples/ run as documented: imported and served over real sockets."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest

from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, Simulator

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_gateway_mounted_under_a_prefix_streams():
    example = load_example("mount_gateway")
    async with Simulator(models=[SimModel(id="m", loaded=True, tokens_per_second=500.0)]) as sim:
        app = example.create_app(Config.model_validate({"upstream": {"url": sim.url}}))
        async with serve_in_background(app) as server, httpx.AsyncClient(trust_env=False) as client:
            home = await client.get(server.url + "/")
            assert home.json()["llm"].endswith("/llm/v1/models")
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            async with client.stream("POST", server.url + "/llm/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                chunks = [chunk async for chunk in response.aiter_raw()]
            assert len(chunks) > 1 and b"".join(chunks).endswith(b"data: [DONE]\n\n")
            assert (await client.get(server.url + "/llm/healthz")).json() == {"status": "ok"}
            outside = await client.get(server.url + "/llm/admin")
            assert outside.status_code == 404 and outside.json()["error"]["code"] == "not_found"


@pytest.fixture
async def controlled_tokens() -> AsyncIterator[tuple[list[anyio.Event], object]]:
    gates = [anyio.Event() for _ in range(3)]

    async def tokens(request: object) -> AsyncIterator[str]:
        async def produce() -> AsyncIterator[str]:
            for n, gate in enumerate(gates):
                await gate.wait()
                yield f"t{n}"

        return produce()

    yield gates, tokens


async def test_a_single_middleware_in_a_starlette_app_times_out_a_silent_stream(controlled_tokens):
    gates, tokens = controlled_tokens
    example = load_example("single_middleware")
    app = example.create_app(tokens, first_token_s=5.0, idle_s=0.3)
    async with serve_in_background(app) as server, httpx.AsyncClient(trust_env=False) as client:
        gates[0].set()  # one token, then silence past idle_s
        response = await client.post(server.url + "/generate")
    assert response.status_code == 200
    assert response.text.startswith("data: t0\n\n")
    assert "event: error" in response.text and '"code":"timeout"' in response.text
    assert "[DONE]" not in response.text


async def test_a_single_middleware_in_a_starlette_app_sheds_past_its_limit(controlled_tokens):
    gates, tokens = controlled_tokens
    example = load_example("single_middleware")
    app = example.create_app(tokens, limit=1)  # and the example's queue of 8
    async with serve_in_background(app) as server, httpx.AsyncClient(trust_env=False, timeout=5) as client:
        results: list[int] = []
        first_refusal = anyio.Event()

        async def one() -> None:
            response = await client.post(server.url + "/generate")
            results.append(response.status_code)
            if response.status_code == 503:
                first_refusal.set()

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
            # One stream holds the slot (its tokens are gated), eight queue, the tenth is shed.
            with anyio.fail_after(5):
                await first_refusal.wait()
            for gate in gates:
                gate.set()
    assert sorted(results) == [200] * 9 + [503]
