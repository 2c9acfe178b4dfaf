"""Embeddings asked for as base64, through a real lmgate in front of the simulator, with official SDKs.

LM Studio ignores ``encoding_format`` and always answers float arrays (lmstudio-bug-tracker#756);
the simulator does the same. The Node SDK asks for base64 by default and, before openai 7.12,
decoded the floats as if they were base64: a vector a quarter as long, all zeros, no error. lmgate
encodes the floats for such clients (middleware/embeddings.py), so every SDK gets the simulator's
vectors at float32 precision.

The Node tests need ``node`` and ``npm ci --prefix tests/node``; without them they skip, unless
``LMGATE_REQUIRE_NODE=1`` (CI), where they fail.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from gateway.app import serve_gateway
from gateway.config.settings import Config
from gateway.simulator import SimModel, Simulator

pytestmark = pytest.mark.anyio

EMBED = "text-embedding-nomic-embed-text-v1.5"
INPUTS = ["The quick brown fox", "jumps over the lazy dog"]
NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def float32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def decoded(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded, validate=True)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    model = SimModel(id=EMBED, type="embeddings", loaded=True, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model]) as simulator:
        yield simulator


@pytest.fixture
async def gateway(sim: Simulator) -> AsyncIterator[str]:
    async with serve_gateway(Config.model_validate({"upstream": {"url": sim.url}})) as (url, _):
        yield url


@pytest.fixture
async def floats(sim: Simulator) -> list[list[float]]:
    """The simulator's vectors, asked for as base64 straight from it: floats, as LM Studio sends."""
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        answer = await client.post(
            sim.url + "/v1/embeddings", json={"model": EMBED, "input": INPUTS, "encoding_format": "base64"}
        )
    vectors = [item["embedding"] for item in answer.json()["data"]]
    assert answer.status_code == 200 and all(isinstance(v, list) and len(v) == 768 for v in vectors)
    return vectors


@pytest.fixture
async def sdk(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="lm-studio", max_retries=0, timeout=10.0) as client:
        yield client


# --- the Python SDK -------------------------------------------------------------------------------


async def test_python_sdk_explicit_base64_gets_base64_of_the_float32_vectors(sdk, floats):
    # The SDK returns an explicitly requested format as the server sent it: a string per vector.
    result = await sdk.embeddings.create(model=EMBED, input=INPUTS, encoding_format="base64")
    embeddings = [item.embedding for item in result.data]
    assert all(isinstance(e, str) for e in embeddings), "lmgate passed LM Studio's floats through"
    assert [decoded(e) for e in embeddings] == [float32(v) for v in floats]


async def test_python_sdk_default_asks_for_base64_and_decodes_it(sdk, floats):
    # openai-python asks for base64 whenever the caller chose no format (numpy or not) and decodes
    # only strings, so it coped with floats already; through lmgate it gets OpenAI's base64.
    result = await sdk.embeddings.create(model=EMBED, input=INPUTS)
    assert [item.embedding for item in result.data] == [float32(v) for v in floats]


async def test_python_sdk_explicit_float_is_untouched(sdk, floats):
    result = await sdk.embeddings.create(model=EMBED, input=INPUTS, encoding_format="float")
    assert [item.embedding for item in result.data] == floats


async def test_the_native_route_is_encoded_too(gateway, floats):
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        answer = await client.post(
            gateway + "/api/v0/embeddings", json={"model": EMBED, "input": INPUTS, "encoding_format": "base64"}
        )
    assert answer.status_code == 200 and int(answer.headers["content-length"]) == len(answer.content)
    assert [decoded(item["embedding"]) for item in answer.json()["data"]] == [float32(v) for v in floats]


async def test_an_error_answer_is_untouched(gateway):
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        answer = await client.post(
            gateway + "/v1/embeddings", json={"model": EMBED, "input": 42, "encoding_format": "base64"}
        )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "input"


# --- the Node SDK ---------------------------------------------------------------------------------


NODE_PACKAGES = ("openai", "openai-v6")  # tests/node/package.json


@pytest.fixture
def node() -> str:
    """``node``, with the packages of tests/node installed; else skip (fail with LMGATE_REQUIRE_NODE=1)."""
    binary = shutil.which("node")
    missing = None
    if binary is None:
        missing = "node is not installed here (Debian: apt-get install -y nodejs npm)"
    elif not all((NODE_DIR / "node_modules" / package).is_dir() for package in NODE_PACKAGES):
        missing = "the Node packages are not installed: run `npm ci --prefix tests/node`"
    if missing is not None:
        if os.environ.get("LMGATE_REQUIRE_NODE") == "1":
            pytest.fail(f"LMGATE_REQUIRE_NODE=1 but {missing}", pytrace=False)
        pytest.skip(missing)
    return binary  # type: ignore[return-value]


async def run_node(node: str, base_url: str, *args: str) -> dict[str, Any]:
    command = [node, str(NODE_DIR / "embeddings.mjs"), "--base-url", base_url + "/v1", "--model", EMBED]
    for text in INPUTS:
        command += ["--input", text]
    with anyio.fail_after(60):
        done = await anyio.run_process([*command, *args], check=False, cwd=NODE_DIR)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


@pytest.mark.parametrize("package", NODE_PACKAGES)
async def test_node_sdk_default_gets_the_vectors_not_zeros(node, gateway, floats, package):
    # openai-v6 (6.30.1, the last 6.x) decodes whatever comes back as base64: LM Studio's floats
    # became 192 zeros. The current openai skips float arrays itself; both get OpenAI's base64 here.
    printed = await run_node(node, gateway, "--sdk", package)
    assert printed["embeddings"] == [float32(v) for v in floats], f"openai {printed['sdk']}"


async def test_node_sdk_explicit_base64_gets_a_base64_string(node, gateway, floats):
    printed = await run_node(node, gateway, "--encoding-format", "base64")
    embeddings = printed["embeddings"]
    assert all(isinstance(e, str) for e in embeddings), f"openai {printed['sdk']} got {str(embeddings)[:80]}"
    assert [decoded(e) for e in embeddings] == [float32(v) for v in floats]
