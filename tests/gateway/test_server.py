"""The ``lmgate`` process: start-up line, exit codes, and graceful drain on SIGTERM (streams that\nfinish within the drain deadline, and streams that outlive it)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import yaml
from anyio.abc import ByteReceiveStream, Process, TaskGroup

from gateway.config.settings import ConfigError
from gateway.server.run import event_loop_options
from gateway.simulator import SimModel, Simulator
from gateway.simulator.testing import parse_sse

pytestmark = pytest.mark.anyio
LISTENING = re.compile(rb"lmgate listening on (http://\S+), forwarding to (\S+)")


def lmgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


async def read_start_line(process: Process) -> str:
    """The gateway's URL from its one start-up line on stderr."""
    assert process.stderr is not None
    buffered = b""
    with anyio.fail_after(20):
        async for chunk in process.stderr:
            buffered += chunk
            match = LISTENING.search(buffered)
            if match:
                return match.group(1).decode()
    raise AssertionError(f"lmgate exited before listening: {buffered.decode(errors='replace')}")


async def discard(stream: ByteReceiveStream) -> None:
    """Keep reading the process's log lines: a full pipe would block its writes, and the gateway."""
    async for _ in stream:
        pass


@asynccontextmanager
async def lmgate_process(
    *args: str, log: Path | None = None, loop: str = "auto"
) -> AsyncIterator[tuple[Process, str]]:
    """``lmgate serve --port 0 ARGS`` on event loop ``loop``; its JSON log lines (stdout) go to
    ``log``, or are dropped."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMGATE_LISTEN__EVENT_LOOP": loop}
    with open(log, "wb") if log is not None else open(os.devnull, "wb") as stdout:
        process = await anyio.open_process(lmgate("serve", "--port", "0", *args), env=env, stdout=stdout)
    try:
        url = await read_start_line(process)
        assert process.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(discard, process.stderr)
            yield process, url
            tg.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()


class LiveStreams:
    """``count`` streamed chat requests for model ``m``; ``all_started`` is set once every one has
    its first chunk, and ``bodies`` collects each whole body when it ends."""

    def __init__(self, client: httpx.AsyncClient, url: str, count: int) -> None:
        self.client, self.url, self.count = client, url, count
        self.started = 0
        self.all_started = anyio.Event()
        self.bodies: list[bytes] = []

    async def start(self, tg: TaskGroup) -> None:
        """Start every stream in ``tg`` and return once each has its first chunk."""
        for _ in range(self.count):
            tg.start_soon(self._stream)
        with anyio.fail_after(10):
            await self.all_started.wait()

    async def _stream(self) -> None:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with self.client.stream("POST", self.url + "/v1/chat/completions", json=body) as response:
            chunks = response.aiter_raw()
            received = [await anext(chunks)]
            self.started += 1
            if self.started == self.count:
                self.all_started.set()
            received += [chunk async for chunk in chunks]
        self.bodies.append(b"".join(received))


@pytest.mark.slow
async def test_sigterm_lets_ten_live_streams_finish_refuses_new_work_and_exits_0(tmp_path, lmgate_loop):
    model = SimModel(id="m", loaded=True, tokens_per_second=20.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0,
                     parallel=16)
    config = tmp_path / "lmgate.yaml"
    config.write_text(yaml.safe_dump({"concurrency": {"limit": 16}}))
    async with Simulator(models=[model]) as sim, lmgate_process(
        "--upstream", sim.url, "--config", str(config), loop=lmgate_loop
    ) as (process, url):
        async with httpx.AsyncClient(trust_env=False, timeout=15) as client:
            streams = LiveStreams(client, url, 10)
            async with anyio.create_task_group() as tg:
                await streams.start(tg)
                process.send_signal(signal.SIGTERM)
                with anyio.fail_after(5):
                    # Readiness flips at once; new work is refused with Connection: close.
                    while (ready := await client.get(url + "/readyz")).status_code != 503:
                        await anyio.sleep(0.02)  # the signal is delivered asynchronously
                    refused = await client.post(url + "/v1/chat/completions", json={"model": "m", "messages": []})
                assert ready.json() == {"status": "draining"}
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "draining"
                assert refused.headers["connection"] == "close" and "retry-after" in refused.headers
        with anyio.fail_after(15):
            assert await process.wait() == 0
    assert len(streams.bodies) == 10
    assert all(body.endswith(b"data: [DONE]\n\n") and b"event: error" not in body for body in streams.bodies)
    assert sim.counters.generations_completed == 10 and sim.counters.generations_cancelled == 0


@pytest.mark.slow
async def test_sigterm_under_load_ends_streams_that_outlive_the_drain_with_an_error_frame_and_stops_lm_studio(tmp_path, lmgate_loop):
    streams = 20
    model = SimModel(id="m", loaded=True, parallel=streams, tokens_per_second=4.0, ttft_base_s=0.0,
                     ttft_per_prompt_token_s=0.0)
    config = tmp_path / "lmgate.yaml"
    config.write_text(yaml.safe_dump({"concurrency": {"limit": streams}, "drain": {"timeout_s": 0.5}}))
    log = tmp_path / "lmgate.log"
    async with Simulator(models=[model]) as sim, lmgate_process(
        "--upstream", sim.url, "--config", str(config), log=log, loop=lmgate_loop
    ) as (process, url):
        async with httpx.AsyncClient(trust_env=False, timeout=15) as client:
            live = LiveStreams(client, url, streams)
            async with anyio.create_task_group() as tg:
                await live.start(tg)
                process.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            assert await process.wait() == 0
        await sim.wait_for(lambda c: c.generations_cancelled == streams, timeout=5)
    assert len(live.bodies) == streams
    for body in live.bodies:
        assert b"data: [DONE]" not in body
        errors = [event.json()["error"] for event in parse_sse(body) if event.event == "error"]
        assert len(errors) == 1 and errors[0]["code"] == "draining"
    assert sim.counters.generations_completed == 0
    events = {line["event"]: line for line in map(json.loads, log.read_text().splitlines())}
    assert events["config_loaded"]["event_loop"] == lmgate_loop
    assert events["drain_start"]["in_flight"] == streams
    assert events["drain_end"]["completed"] is False and events["drain_end"]["aborted"] == streams


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows")
def test_the_event_loop_is_uvloop_where_installed_and_asking_for_a_missing_one_fails_naming_the_key(monkeypatch):
    assert event_loop_options("auto") == {"use_uvloop": True}
    assert event_loop_options("uvloop") == {"use_uvloop": True}
    assert event_loop_options("asyncio") == {}
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: the import fails
    assert event_loop_options("auto") == {}
    with pytest.raises(ConfigError, match="listen.event_loop: .*got uvloop: it cannot be imported"):
        event_loop_options("uvloop")


def test_a_bad_config_exits_2_before_binding_and_names_the_key(tmp_path):
    bad = tmp_path / "lmgate.yaml"
    bad.write_text("timeouts: {first_token_s: soon}\n")
    result = subprocess.run(lmgate("serve", "--config", str(bad)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert str(bad) in result.stderr and "timeouts.first_token_s" in result.stderr
    assert "listening" not in result.stderr


def test_a_pool_smaller_than_the_concurrency_limit_exits_2_naming_both_keys_and_the_minimum(tmp_path):
    # Requests past the pool would wait inside the HTTP client, unseen by the queue, its metrics and
    # its Retry-After: lmgate refuses the configuration instead of starting with two limits.
    path = tmp_path / "lmgate.yaml"
    path.write_text("concurrency: {limit: 120}\nupstream: {pool: {max_connections: 50}}\n")
    command = lmgate("serve", "--port", "0", "--config", str(path))
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "upstream.pool.max_connections (50) is smaller than concurrency.limit (120)" in result.stderr
    assert "at least 125" in result.stderr and "listening" not in result.stderr


def test_config_check_prints_the_effective_config_without_secrets(tmp_path):
    path = tmp_path / "lmgate.yaml"
    path.write_text("upstream: {api_key: sk-lm-secret:token}\ntimeouts: {idle_s: 12}\n")
    result = subprocess.run(lmgate("config", "check", str(path)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["timeouts"]["idle_s"] == 12
    assert "sk-lm-secret" not in result.stdout
    assert "valid" in result.stderr


def test_config_schema_is_json_schema():
    result = subprocess.run(lmgate("config", "schema"), capture_output=True, text=True, timeout=30)
    schema = json.loads(result.stdout)
    assert schema["additionalProperties"] is False and "timeouts" in schema["properties"]
