"""LM Studio's own Python SDK (``lmstudio``, pinned 1.5.0) through lmgate to the simulator.

Each test runs the same steps against the simulator directly and through lmgate where the answer
must be the same. API tokens arrived with SDK 1.6: 1.5.0's client is given 1.6's auth packet
(``TokenClient``, built with the SDK's own helper), which is all 1.6 changes on the wire.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import lmstudio
import pytest
from lmstudio import LMStudioServerError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.app import serve_gateway
from gateway.config.settings import Config
from gateway.simulator import SimModel, SimSettings, Simulator
from middleware.auth import hash_key
from tests.gateway.test_server import lmgate_process  # lmgate serve as its own process

pytestmark = pytest.mark.anyio

INSTANT = {"ttft_base_s": 0.0, "ttft_per_prompt_token_s": 0.0, "tokens_per_second": 1000.0}
CLIENT_KEY = "sk-lm-Client01:abcdefghij0123456789"
SIM_TOKEN = "sk-lm-Upstrm01:ZYXWVUTSRQ9876543210"


class TokenClient(lmstudio.AsyncClient):
    """1.5.0's client sending the auth packet 1.6 builds from an API token."""

    def __init__(self, api_host: str, token: str) -> None:
        self._token = token
        super().__init__(api_host)

    def _create_auth_message(self) -> dict[str, Any]:
        identifier, passkey = self._token.removeprefix("sk-lm-").split(":")
        return self._format_auth_message(identifier, passkey)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    models = [
        SimModel(id="alpha", loaded=True, **INSTANT),
        SimModel(id="cold", load_delay_s=0.3, **INSTANT),
        SimModel(id="paced", loaded=True, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0, tokens_per_second=20.0),
        # Five tokens (completion_tokens) in 5 s: still predicting when the drain deadline comes.
        SimModel(id="slow", loaded=True, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0, tokens_per_second=1.0),
    ]
    async with Simulator(models=models, settings=SimSettings(completion_tokens=5)) as simulator:
        yield simulator


@asynccontextmanager
async def lmgate(sim: Simulator, **sections: Any) -> AsyncIterator[str]:
    document = {"upstream": {"url": sim.url}, "models": {"enabled": False}, **sections}
    async with serve_gateway(Config.model_validate(document)) as (url, _):
        yield url.removeprefix("http://")


async def listing(client: lmstudio.AsyncClient) -> tuple[list[str], list[str]]:
    downloaded = [m.model_key for m in await client.list_downloaded_models()]
    return downloaded, [m.identifier for m in await client.list_loaded_models()]


async def test_the_sdk_through_lmgate_sees_what_it_sees_direct(sim):
    async with lmstudio.AsyncClient(sim.url.removeprefix("http://")) as direct:
        expected = await listing(direct)
        expected_answer = (await (await direct.llm.model("alpha")).respond("Say something")).content
    async with lmgate(sim) as host, lmstudio.AsyncClient(host) as client:
        assert await listing(client) == expected
        llm = await client.llm.model("alpha")
        result = await llm.respond("Say something")
        stream = await llm.respond_stream("Say something")
        fragments = [fragment.content async for fragment in stream]
    assert result.content == expected_answer and result.stats.stop_reason == "eosFound"
    assert "".join(fragments) == expected_answer


async def test_respond_stream_cancelled_through_lmgate_stops_the_prediction(sim):
    async with lmgate(sim) as host, lmstudio.AsyncClient(host) as client:
        llm = await client.llm.model("paced")
        stream = await llm.respond_stream("Tell me a long story", config={"maxTokens": 1000})
        seen = []
        async for fragment in stream:
            seen.append(fragment.content)
            if len(seen) == 3:
                await stream.cancel()
        assert stream.stats is not None and stream.stats.stop_reason == "userStopped"
    await sim.wait_for(lambda c: c.generations_cancelled == 1)
    assert sim.counters.generations_completed == 0


async def test_a_cold_model_loads_through_lmgate(sim):
    async with lmgate(sim) as host, lmstudio.AsyncClient(host) as client:
        llm = await client.llm.model("cold")
        assert llm.identifier == "cold"
        assert (await llm.respond("Hello")).content
    assert (sim.counters.loads_started, sim.counters.loads_completed) == (1, 1)


async def test_client_keys_are_required_and_the_simulators_token_is_lmgates(sim):
    sim.settings.api_token = SIM_TOKEN  # "Require Authentication" on: only lmgate's token works there
    keyed = {"auth": {"keys": [hash_key(CLIENT_KEY)]}}
    async with lmgate(sim, **keyed, upstream={"url": sim.url, "api_key": SIM_TOKEN}) as host:
        async with TokenClient(host, CLIENT_KEY) as client:
            assert [m.identifier for m in await client.list_loaded_models()] == ["alpha", "paced", "slow"]
        for refused in (lmstudio.AsyncClient(host), TokenClient(host, "sk-lm-Client01:" + "x" * 20)):
            with pytest.raises(LMStudioServerError, match="Authentication failed"):
                async with refused as client:
                    await client.list_loaded_models()


_SDK_16 = textwrap.dedent("""
    import json, sys
    import lmstudio
    host, key, wrong = sys.argv[1:4]
    out = {"version": lmstudio.__version__}
    with lmstudio.Client(host, api_token=key) as client:
        out["loaded"] = [m.identifier for m in client.llm.list_loaded()]
        out["answer"] = client.llm.model("alpha").respond("Say hi", config={"maxTokens": 3}).content
    try:
        with lmstudio.Client(host, api_token=wrong) as client:
            client.llm.list_loaded()
        out["wrong"] = "accepted"
    except lmstudio.LMStudioServerError as exc:
        out["wrong"] = str(exc)
    print(json.dumps(out))
""")


@pytest.mark.slow
async def test_the_real_sdk_16_presents_an_lmgate_key_as_its_api_token(sim):
    # SDK 1.6 is the first with API tokens (LMSTUDIO_API_TOKEN / api_token=): the user gives it an
    # lmgate client key in LM Studio's sk-lm-<id>:<passkey> shape; LM Studio only ever sees lmgate's.
    target = os.environ.get("LMGATE_LMSTUDIO_16")
    if not target:
        pytest.skip("set LMGATE_LMSTUDIO_16 to a `pip install --no-deps --target DIR lmstudio==1.6.0b1` directory")
    sim.settings.api_token = SIM_TOKEN
    keyed = {"auth": {"keys": [hash_key(CLIENT_KEY)]}}
    env = {k: v for k, v in os.environ.items() if k not in ("LMSTUDIO_API_TOKEN", "LM_API_TOKEN")}
    env["PYTHONPATH"] = target
    async with lmgate(sim, **keyed, upstream={"url": sim.url, "api_key": SIM_TOKEN}) as host:
        done = await anyio.run_process(
            [sys.executable, "-c", _SDK_16, host, CLIENT_KEY, "sk-lm-Client01:" + "x" * 20],
            env=env, check=False, stderr=subprocess.STDOUT,
        )
    assert done.returncode == 0, done.stdout.decode()
    out = json.loads(done.stdout.decode().splitlines()[-1])
    assert out["version"] == "1.6.0b1"
    assert out["loaded"] == ["alpha", "paced", "slow"] and out["answer"]
    assert out["wrong"].startswith("Authentication failed")


def _streaming_client(host: str) -> str:
    return textwrap.dedent(f"""
        import lmstudio
        with lmstudio.Client({host!r}) as client:
            llm = client.llm.model("paced")
            for fragment in llm.respond_stream("Tell me a long story", config={{"maxTokens": 1000}}):
                print("fragment", flush=True)
    """)


async def test_a_client_killed_mid_stream_stops_the_prediction_upstream(sim):
    async with lmgate(sim) as host:
        process = await anyio.open_process([sys.executable, "-c", _streaming_client(host)], stderr=subprocess.DEVNULL)
        async with process:
            assert process.stdout is not None
            with anyio.fail_after(20):
                async for chunk in process.stdout:
                    if b"fragment" in chunk:
                        break
            process.kill()
        await sim.wait_for(lambda c: c.generations_cancelled == 1, timeout=10)
    assert sim.counters.generations_completed == 0


@pytest.mark.slow
async def test_sigterm_with_sockets_open_refuses_upgrades_and_closes_them_with_1001_at_the_deadline(sim, tmp_path):
    config = tmp_path / "lmgate.yaml"
    config.write_text("models: {enabled: false}\ndrain: {timeout_s: 0.5}\n")
    async with lmgate_process("--upstream", sim.url, "--config", str(config)) as (process, url):
        host = url.removeprefix("http://")
        async with lmstudio.AsyncClient(host) as client, connect(f"ws://{host}/system", proxy=None) as raw:
            await raw.send('{"authVersion":1,"clientIdentifier":"guest:1","clientPasskey":"2"}')
            assert json.loads(await raw.recv())["success"] is True
            llm = await client.llm.model("slow")
            stream = await llm.respond_stream("Tell me a long story")
            await stream.start()
            await sim.wait_for(lambda c: c.generations_started == 1)
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                while True:  # the signal arrives asynchronously; then upgrades are refused
                    try:
                        async with connect(f"ws://{host}/llm", proxy=None):
                            pass
                    except InvalidStatus as refused:
                        assert refused.response.status_code == 503
                        break
                    await anyio.sleep(0.02)
                with pytest.raises(ConnectionClosed) as closed:
                    await raw.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            with anyio.fail_after(10), suppress(lmstudio.LMStudioError):
                async for _ in stream:  # the SDK's socket was closed too: its stream ends
                    pass
        with anyio.fail_after(15):
            assert await process.wait() == 0
    await sim.wait_for(lambda c: c.generations_cancelled == 1, timeout=10)  # LM Studio stopped predicting
