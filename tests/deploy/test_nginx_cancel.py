"""A client that leaves at NGINX reaches the LM Studio simulator as a cancel, through each sample.

NGINX closes its connection to lmgate when the client leaves (``proxy_ignore_client_abort off``),
lmgate closes its upstream stream, and the simulator stops generating: it counts the cancel. The
answer would take 20 s, so only a cancel can end it within the test's few seconds.
"""

from __future__ import annotations

import anyio
import httpx
import pytest

from gateway.simulator import SimModel, SimSettings, Simulator
from gateway.simulator.testing import FrameReader

pytestmark = pytest.mark.anyio

MODEL = SimModel(id="slow-model", loaded=True, tokens_per_second=20.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
LONG_ANSWER = SimSettings(completion_tokens=400)  # 20 s at 20 tokens/s
CHAT = "/v1/chat/completions"


def request(stream: bool) -> dict[str, object]:
    return {"model": MODEL.id, "stream": stream, "messages": [{"role": "user", "content": "Tell me everything"}]}


async def test_a_client_leaving_mid_stream_cancels_the_generation(sample, deployed):
    async with (
        Simulator(models=[MODEL], settings=LONG_ANSWER) as sim,
        deployed(sample, sim.url) as proxy,
        httpx.AsyncClient(timeout=10.0, trust_env=False) as client,
    ):
        async with client.stream("POST", proxy.base + CHAT, json=request(stream=True)) as response:
            assert response.status_code == 200
            with anyio.fail_after(3):
                await FrameReader(response).next(3)
        # The client hung up after three frames.
        await sim.wait_for(lambda c: c.generations_cancelled == 1, timeout=3)
        assert sim.counters.generations_completed == 0
        assert sim.counters.tokens_before_cancel[0] < LONG_ANSWER.completion_tokens


async def test_a_client_leaving_a_non_streaming_request_cancels_the_generation(sample, deployed):
    # lmgate streams non-streaming completions upstream and assembles them, so this cancel can
    # reach the model too (LM Studio only notices a non-streaming client when it writes).
    async with (
        Simulator(models=[MODEL], settings=LONG_ANSWER) as sim,
        deployed(sample, sim.url) as proxy,
        httpx.AsyncClient(timeout=10.0, trust_env=False) as client,
    ):
        async def ask() -> None:
            await client.post(proxy.base + CHAT, json=request(stream=False))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await sim.wait_for(lambda c: c.generations_started == 1, timeout=3)
            tg.cancel_scope.cancel()  # the client gives up and closes its connection
        await sim.wait_for(lambda c: c.generations_cancelled == 1, timeout=3)
        assert sim.counters.generations_completed == 0
