"""An ``lmgate serve`` process under a low open-files limit: a flood of idle connections neither
floods its log nor locks out its health check, and a limit it cannot serve under fails at start-up."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from gateway.config import Config
from gateway.server.connections import RESERVED_DESCRIPTORS

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX"),
]

LISTENING = re.compile(r"lmgate listening on http://127\.0\.0\.1:(\d+)")
# Sets RLIMIT_NOFILE (soft, hard) from argv[1:3], then runs `lmgate` with the rest: preexec_fn
# would do the same, but is unsafe in a process with threads (anyio's worker threads).
LAUNCH = (
    "import resource, runpy, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))\n"
    "sys.argv = ['lmgate', *sys.argv[3:]]\n"
    "runpy.run_module('gateway', run_name='__main__')\n"
)
IDLE_CONNECTIONS = 400


@dataclass
class Lmgate:
    process: anyio.abc.Process
    port: int
    stdout: Path  # the JSON log
    stderr: Path  # the start-up line, and anything Python or asyncio print

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.read_text().splitlines() if line.startswith("{")]

    async def wait_for_event(self, name: str, timeout_s: float = 30) -> dict:
        with anyio.fail_after(timeout_s):
            while True:
                found = [event for event in self.events() if event.get("event") == name]
                if found:
                    return found[0]
                await anyio.sleep(0.1)  # another process's log file: nothing to await


def launch(soft: int, hard: int, *args: str) -> list[str]:
    return [sys.executable, "-c", LAUNCH, str(soft), str(hard), "serve", "--port", "0", *args]


@asynccontextmanager
async def lmgate_process(
    tmp_path: Path, soft: int, hard: int, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[Lmgate]:
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "LMGATE_LOGGING__FORMAT": "json", **(env or {})}
    with stdout.open("wb") as out, stderr.open("wb") as err:  # files, not pipes: a flood cannot block lmgate
        process = await anyio.open_process(
            launch(soft, hard, *args), env=environment, stdout=out, stderr=err
        )
    try:
        with anyio.fail_after(30):
            while not (match := LISTENING.search(stderr.read_text(errors="replace"))):
                assert process.returncode is None, stderr.read_text(errors="replace")
                await anyio.sleep(0.05)  # another process's start-up
        yield Lmgate(process, int(match.group(1)), stdout, stderr)
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()


def enough_descriptors_here(count: int) -> None:
    """This test process holds ``count`` connections: raise its own soft limit if needed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count + 256:
        if hard != resource.RLIM_INFINITY and hard < count + 256:
            pytest.skip(f"needs {count + 256} open files in the test process; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, hard))


async def healthz(port: int) -> bytes:
    """GET /healthz on a fresh connection; the answer's head."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(b"GET /healthz HTTP/1.1\r\nHost: lmgate\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive()
    return received


def cap(open_files: int) -> int:
    """The default listen.max_connections for an open-files limit, with the default config."""
    pool = Config().upstream_pool_connections()
    assert pool is not None
    return open_files - pool - RESERVED_DESCRIPTORS


@pytest.mark.slow
async def test_idle_connections_beyond_the_open_files_limit_neither_flood_the_log_nor_lock_out_healthz(
    sim, tmp_path, lmgate_loop
):
    # Before: with 256 descriptors, the 400 idle connections made asyncio log a traceback per
    # accept() attempt (megabytes of stderr a second, a busy core), and /healthz on a fresh
    # connection went unanswered until hypercorn's 75 s keep-alive timeout closed the idle ones.
    # On uvloop the cap was not applied at all (libuv accepts without GuardedListener.accept()).
    enough_descriptors_here(IDLE_CONNECTIONS)
    env = {"LMGATE_LISTEN__EVENT_LOOP": lmgate_loop}
    async with lmgate_process(tmp_path, 256, 256, "--upstream", sim.url, env=env) as gw:
        limits = await gw.wait_for_event("connection_limits")
        # 256 less the upstream pool (derived from the concurrency limit) and 64 for lmgate itself.
        assert limits["max_connections"] == cap(256) and limits["open_files_limit"] == 256
        idle = [await anyio.connect_tcp("127.0.0.1", gw.port) for _ in range(IDLE_CONNECTIONS)]
        try:
            with anyio.fail_after(30):  # generous; lmgate answers as soon as it accepts
                assert (await healthz(gw.port)).startswith(b"HTTP/1.1 200")
            exhausted = await gw.wait_for_event("connections_exhausted")
            assert exhausted["reason"] == "max_connections" and exhausted["max_connections"] == cap(256)
        finally:
            for stream in idle:
                await stream.aclose()
        recovered = await gw.wait_for_event("connections_recovered")
        assert recovered["evicted"] + recovered["refused"] >= IDLE_CONNECTIONS - cap(256)
        with anyio.fail_after(30):
            assert (await healthz(gw.port)).startswith(b"HTTP/1.1 200")
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            metrics = (await client.get(f"http://127.0.0.1:{gw.port}/metrics")).text
        series = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("lmgate_client_connections"))
        assert float(series["lmgate_client_connections_max"]) == cap(256)
        shed = float(series["lmgate_client_connections_evicted_total"]) + float(series["lmgate_client_connections_refused_total"])
        assert shed >= IDLE_CONNECTIONS - cap(256)
        stderr = gw.stderr.read_text(errors="replace").splitlines()
        events = [event["event"] for event in gw.events()]
    assert len(stderr) <= 2, stderr[:10]  # the start-up line; no tracebacks
    assert events.count("connections_exhausted") == 1 and events.count("connections_recovered") == 1
    assert len(events) < 20, events


async def test_the_soft_open_files_limit_is_raised_to_the_hard_one(sim, tmp_path):
    async with lmgate_process(tmp_path, 256, 4096, "--upstream", sim.url) as gw:
        limits = await gw.wait_for_event("connection_limits")
    assert limits["open_files_limit"] == 4096
    assert limits["max_connections"] == cap(4096)


async def test_a_connection_cap_the_open_files_limit_cannot_hold_fails_at_start_up(sim, tmp_path):
    env = {**os.environ, "LMGATE_LISTEN__MAX_CONNECTIONS": "1000"}
    result = await anyio.run_process(
        launch(256, 256, "--upstream", sim.url), env=env, check=False
    )
    assert result.returncode == 2  # a configuration error: systemd does not restart it
    message = result.stderr.decode()
    assert f"listen.max_connections: expected at most {cap(256)} with an open-files limit of 256" in message
    assert "LimitNOFILE" in message
