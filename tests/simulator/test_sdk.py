"""LM Studio's own Python SDK (``lmstudio``, pinned 1.5.0) against the simulator over real sockets.

The simulator runs on a FakeClock: a cold load or a paced prediction moves only when a test
advances the clock, once the simulator's counters say the load or the prediction is waiting.
API tokens arrived in the SDK with 1.6 (still a beta): the always-run test builds 1.6's auth packet
with the 1.5.0 SDK's own helper; the 1.6.0b1 test runs the real 1.6 client in a subprocess, from a
``pip install --no-deps --target DIR lmstudio==1.6.0b1`` directory named by ``LMGATE_LMSTUDIO_16``
(.ci/run makes one).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import lmstudio
import pytest
from lmstudio import LMStudioModelNotFoundError, LMStudioServerError, LMStudioWebsocketError

from gateway.simulator import Counters, SimModel, SimSettings, Simulator

pytestmark = pytest.mark.anyio

LOAD_DELAY_S = 5.0
#: Loaded, no prefill, 10 tokens a second: the first token at once, then one per 0.1 s advanced.
PACED = {"load_delay_s": 0.0, "ttft_base_s": 0.0, "ttft_per_prompt_token_s": 0.0, "tokens_per_second": 10.0}
#: A token as LM Studio issues them: sk-lm-<8 alphanumerics>:<20 alphanumerics>.
TOKEN = "sk-lm-Ab12Cd34:" + "Ef56Gh78Ij90Kl12Mn34"
WRONG_TOKEN = "sk-lm-Ab12Cd34:" + "x" * 20


def host(sim: Simulator) -> str:
    return sim.url.removeprefix("http://")


@pytest.fixture
def models(instant: dict[str, float]) -> list[SimModel]:
    return [
        SimModel(id="alpha", loaded=True, **instant),
        SimModel(id="beta", **{**instant, "load_delay_s": LOAD_DELAY_S}),
        SimModel(id="paced", loaded=True, **PACED),
        SimModel(id="embed", type="embeddings", **instant),
    ]


@pytest.fixture
async def sim(models, clock) -> AsyncIterator[Simulator]:
    async with Simulator(models=models, settings=SimSettings(completion_tokens=5), clock=clock) as sim:
        yield sim


@pytest.fixture
async def lms(sim) -> AsyncIterator[lmstudio.AsyncClient]:
    async with lmstudio.AsyncClient(host(sim)) as client:
        yield client


async def advance_when(sim: Simulator, predicate: Callable[[Counters], bool], seconds: float) -> None:
    """Move the FakeClock once the simulator is waiting on it (never before: no race)."""
    await sim.wait_for(predicate)
    sim.clock.advance(seconds)


async def test_lists_downloaded_and_loaded_models(lms):
    downloaded = await lms.list_downloaded_models()
    assert [(m.model_key, m.type) for m in downloaded] == [
        ("alpha", "llm"),
        ("beta", "llm"),
        ("paced", "llm"),
        ("embed", "embedding"),
    ]
    assert [m.model_key for m in await lms.llm.list_downloaded()] == ["alpha", "beta", "paced"]
    assert [m.identifier for m in await lms.list_loaded_models()] == ["alpha", "paced"]
    assert await lms.embedding.list_loaded() == []


async def test_a_cold_model_handle_loads_with_the_load_delay(lms, sim):
    progress: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(advance_when, sim, lambda c: c.loads_started == 1, LOAD_DELAY_S)
        llm = await lms.llm.model("beta", ttl=600, on_load_progress=progress.append)
    assert llm.identifier == "beta"
    assert (sim.counters.loads_started, sim.counters.loads_completed) == (1, 1)
    assert sim.state()["instances"][-1]["ttlMs"] == 600_000  # the SDK's ttl is the instance's idle TTL
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(set(progress))
    # Loaded now: a second handle is the same instance, no second load.
    assert await lms.llm.model("beta") == llm
    assert sim.counters.loads_started == 1
    assert "beta" in [m.identifier for m in await lms.llm.list_loaded()]
    assert (await llm.respond("Hello")).content


async def test_a_jit_load_auto_evicts_the_other_jit_model(lms, sim, caplog):
    caplog.set_level(logging.INFO)
    async with anyio.create_task_group() as tg:
        tg.start_soon(advance_when, sim, lambda c: c.loads_started == 1, LOAD_DELAY_S)
        await lms.llm.model("beta")
    await lms.embedding.model("embed")  # a JIT load too: beta, JIT-loaded, goes (Auto-Evict)
    assert sim.counters.evictions == 1
    assert [m.identifier for m in await lms.list_loaded_models()] == ["alpha", "paced", "embed"]
    assert "Unloading other JIT model" in caplog.text  # the SDK logs the unloadingOtherJITModel packet


async def test_respond_gives_the_answer_and_its_stats(lms, sim):
    llm = await lms.llm.model("alpha")
    result = await llm.respond("Say something")
    assert len(result.content.split()) == 5  # SimSettings.completion_tokens, one word a token
    assert result.stats.stop_reason == "eosFound"
    assert result.stats.predicted_tokens_count == 5
    assert result.stats.prompt_tokens_count == 4  # "Say something": 13 characters, 4 per token
    assert result.model_info.model_key == "alpha"
    assert (sim.counters.requests, sim.counters.generations_completed) == (1, 1)
    assert (await llm.respond("Say something")).content == result.content  # deterministic


async def test_respond_stream_sends_fragments_then_the_result(lms):
    llm = await lms.llm.model("alpha")
    stream = await llm.respond_stream("Say something")
    fragments = [fragment.content async for fragment in stream]
    assert len(fragments) == 5
    assert stream.result().content == "".join(fragments)
    assert stream.stats is not None and stream.stats.stop_reason == "eosFound"


async def test_cancel_after_three_fragments_stops_the_prediction(lms, sim):
    llm = await lms.llm.model("paced")
    stream = await llm.respond_stream("Tell me a long story")
    seen: list[str] = []
    async for fragment in stream:
        seen.append(fragment.content)
        if len(seen) < 3:
            sim.clock.advance(0.1)  # the next token is due
        else:
            await stream.cancel()  # the SDK drops what comes after; the server answers "userStopped"
    assert len(seen) == 3
    assert stream.stats is not None and stream.stats.stop_reason == "userStopped"
    assert stream.result().content == "".join(seen)
    assert sim.counters.generations_cancelled == 1
    assert sim.counters.tokens_before_cancel == [3]
    assert sim.counters.generations_completed == 0
    assert sim.counters.active_generations == 0


async def test_a_socket_closed_mid_prediction_stops_it(sim):
    async with lmstudio.AsyncClient(host(sim)) as client:
        llm = await client.llm.model("paced")
        stream = await llm.respond_stream("Tell me a long story")
        await stream.start()
        await sim.wait_for(lambda c: c.generations_started == 1)
    # The client left with the prediction under way: the simulator stops it as LM Studio does.
    await sim.wait_for(lambda c: c.generations_cancelled == 1)
    assert sim.counters.generations_completed == 0


async def test_complete_with_max_tokens(lms):
    llm = await lms.llm.model("alpha")
    result = await llm.complete("Once upon a time", config={"maxTokens": 2})
    assert len(result.content.split()) == 2
    assert result.stats.stop_reason == "maxPredictedTokensReached"
    assert result.prediction_config.max_tokens == 2


async def test_embed_matches_the_http_route(lms, sim, client):
    model = await lms.embedding.model("embed")
    vector = await model.embed("hello world")
    assert len(vector) == 768
    response = await client.post(sim.url + "/v1/embeddings", json={"model": "embed", "input": "hello world"})
    assert vector == response.json()["data"][0]["embedding"]
    assert await model.embed(["a", "b"]) == [await model.embed("a"), await model.embed("b")]


async def test_unload_then_predicting_is_refused(lms, sim):
    llm = await lms.llm.model("alpha")
    await llm.unload()
    assert [m.identifier for m in await lms.llm.list_loaded()] == ["paced"]
    assert sim.counters.unloads == 1
    with pytest.raises(LMStudioModelNotFoundError):
        await llm.respond("Hello")
    with pytest.raises(LMStudioServerError, match="Cannot find a model with the identifier"):
        await lms.llm.unload("alpha")


async def test_a_model_that_is_not_downloaded(lms, sim):
    with pytest.raises(LMStudioServerError, match='matching the path "nope"'):
        await lms.llm.model("nope")
    assert sim.counters.loads_started == 0


async def test_load_new_instance_gets_its_own_identifier(lms, sim):
    llm = await lms.llm.load_new_instance("alpha", "alpha-copy", ttl=None)
    assert llm.identifier == "alpha-copy"
    assert [m.identifier for m in await lms.llm.list_loaded()] == ["alpha", "paced", "alpha-copy"]
    assert (await llm.get_info()).identifier == "alpha-copy"
    assert (await llm.respond("Hello")).stats.stop_reason == "eosFound"
    assert sim.counters.loads_started == 1  # an out-of-band load: never JIT, never evicted


async def test_a_load_that_fails(lms, sim):
    sim.inject_fault("load_failure", model="beta", message="Engine protocol startup was aborted.")
    async with anyio.create_task_group() as tg:
        tg.start_soon(advance_when, sim, lambda c: c.loads_started == 1, LOAD_DELAY_S)
        with pytest.raises(LMStudioServerError, match='Failed to load model "beta". Error: Engine protocol startup'):
            await lms.llm.model("beta")
    assert (sim.counters.loads_failed, sim.counters.faults_applied) == (1, 1)
    assert "beta" not in [m.identifier for m in await lms.llm.list_loaded()]


async def test_a_prediction_that_errors(lms, sim):
    sim.inject_fault("error_mid_stream", model="alpha", after_tokens=2, message="The model has crashed.")
    llm = await lms.llm.model("alpha")
    fragments: list[str] = []
    with pytest.raises(LMStudioServerError, match="The model has crashed."):
        await llm.respond("Hello", on_prediction_fragment=lambda f: fragments.append(f.content))
    assert len(fragments) == 2
    assert (sim.counters.generations_failed, sim.counters.active_generations) == (1, 0)
    assert (await llm.respond("Hello")).stats.stop_reason == "eosFound"  # the fault fired once


async def test_a_server_crash_mid_prediction_closes_the_socket(sim):
    sim.inject_fault("crash_mid_stream", model="alpha", after_tokens=1)
    async with lmstudio.AsyncClient(host(sim)) as client:
        llm = await client.llm.model("alpha")
        with pytest.raises(LMStudioWebsocketError):
            await llm.respond("Hello")
    assert sim.counters.generations_failed == 1


async def test_the_sync_client(sim):
    """``lmstudio.Client`` runs its own event loop in a thread: drive it from a worker thread."""

    def use_sync_client() -> tuple[list[str], str, int]:
        with lmstudio.Client(host(sim)) as client:
            loaded = [m.identifier for m in client.llm.list_loaded()]
            llm = client.llm.model("alpha")
            result = llm.respond("Say something")
            stream = llm.respond_stream("Say something")
            fragments = [fragment.content for fragment in stream]
            assert "".join(fragments) == result.content
            return loaded, result.stats.stop_reason, len(fragments)

    assert await anyio.to_thread.run_sync(use_sync_client) == (["alpha", "paced"], "eosFound", 5)
    assert sim.counters.generations_completed == 2


class TokenClient(lmstudio.AsyncClient):
    """SDK 1.5.0 with the auth packet SDK 1.6 builds from an API token (its own ``_format_auth_message``)."""

    def __init__(self, api_host: str, token: str) -> None:
        self._token = token
        super().__init__(api_host)

    def _create_auth_message(self) -> dict[str, Any]:
        identifier, _, passkey = self._token.removeprefix("sk-lm-").partition(":")
        return self._format_auth_message(identifier, passkey)


async def test_an_api_token_is_required_when_set(models, clock, client):
    async with Simulator(models=models, settings=SimSettings(api_token=TOKEN), clock=clock) as sim:
        async with TokenClient(host(sim), TOKEN) as lms:
            assert [m.identifier for m in await lms.llm.list_loaded()] == ["alpha", "paced"]
        # SDK 1.5.0 fails to format the server's string error (1.6 does: see the test below).
        for refused in (TokenClient(host(sim), WRONG_TOKEN), lmstudio.AsyncClient(host(sim))):
            with pytest.raises((LMStudioServerError, ValueError)):
                async with refused:
                    pass
        # The same token is the HTTP routes' bearer token.
        headers = {"authorization": f"Bearer {TOKEN}"}
        assert (await client.get(sim.url + "/v1/models", headers=headers)).status_code == 200


SDK_16_SCRIPT = """
import json, sys
import lmstudio
host, token, wrong = sys.argv[1:4]
out = {"version": lmstudio.__version__}
with lmstudio.Client(host, api_token=token) as client:
    out["loaded"] = [m.identifier for m in client.llm.list_loaded()]
for name, attempt in (("wrong", wrong), ("none", None)):
    try:
        with lmstudio.Client(host, api_token=attempt) as client:
            client.llm.list_loaded()
        out[name] = "accepted"
    except lmstudio.LMStudioServerError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.slow
async def test_sdk_16_api_token(models, clock):
    target = os.environ.get("LMGATE_LMSTUDIO_16")
    if not target:
        pytest.skip("set LMGATE_LMSTUDIO_16 to a `pip install --no-deps --target DIR lmstudio==1.6.0b1` directory")
    env = {k: v for k, v in os.environ.items() if k not in ("LMSTUDIO_API_TOKEN", "LM_API_TOKEN")}
    env["PYTHONPATH"] = target
    async with Simulator(models=models, settings=SimSettings(api_token=TOKEN), clock=clock) as sim:
        done = await anyio.run_process(
            [sys.executable, "-c", SDK_16_SCRIPT, host(sim), TOKEN, WRONG_TOKEN],
            env=env,
            check=False,
            stderr=subprocess.STDOUT,
        )
    assert done.returncode == 0, done.stdout.decode()
    out = json.loads(done.stdout.decode().splitlines()[-1])
    assert out["version"] == "1.6.0b1"
    assert out["loaded"] == ["alpha", "paced"]
    assert out["wrong"].startswith("Authentication failed") and "Invalid LM Studio API token" in out["wrong"]
    assert out["none"].startswith("Authentication failed") and "token is required" in out["none"]
