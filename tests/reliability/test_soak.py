"""A bounded soak: minutes of mixed traffic with faults injected all along, against lmgate as it is
deployed: its own process (``python -m gateway serve --config FILE``), the simulator and the load
generator in the test's process.

Every request is accounted for (served, or failed with an error code the client could read: an
OpenAI error body or an SSE error frame, or left on purpose by the client); lmgate's memory (VmRSS
of its process) stays flat within 10% after the warm-up; nothing is left behind: lmgate's
descriptors, its connections to the simulator and its requests in flight (its /metrics) are back to
the warm state, and so are the simulator's tasks. Only lmgate's process is measured: a client and
a simulator sharing its heap and its event loop would be measured with it (docs/performance.md).

``LMGATE_SOAK_S`` sets the length (default 120 s); ``LMGATE_SOAK_TRANSPORT`` the upstream transport
(``aiohttp`` or ``httpx``; default: ``upstream.transport``'s default); ``LMGATE_SOAK_LOOP`` lmgate's
event loop (``listen.event_loop``: ``auto``, ``uvloop`` or ``asyncio``; default ``auto``). The
figures are printed at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.simulator.testing import parse_sse

pytestmark = pytest.mark.anyio

SOAK_S = float(os.environ.get("LMGATE_SOAK_S", "120"))
TRANSPORT = os.environ.get("LMGATE_SOAK_TRANSPORT")  # None: the configured default
LOOP = os.environ.get("LMGATE_SOAK_LOOP", "auto")
WORKERS = 16
CHAT = "/v1/chat/completions"
WARM, SLOW = "qwen2.5-7b-instruct", "slow-7b"
KEEPALIVE_S = 0.5  # idle upstream connections close soon, so a quiet lmgate holds only what it leaked
FAULTS = [
    ("http_error", {"status": 503, "message": "busy"}),
    ("http_error", {"status": 500}),
    ("reset_before_response", {}),
    ("crash_mid_stream", {"after_tokens": 2}),
    ("error_mid_stream", {"after_tokens": 2}),
    ("hang_after_headers", {}),
    ("hang_before_headers", {}),
    ("malformed_sse", {}),
    ("invalid_json", {}),
    ("context_overflow", {"mode": "b"}),
    ("slow_bytes", {"delay_s": 0.002}),
]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def tcp_peers(pid: int) -> list[int]:
    """The remote port of each established TCP connection process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed while listed
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for fields in (line.split() for line in lines):
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                peers.append(int(fields[2].rsplit(":", 1)[1], 16))
    return peers


def metric_sum(text: str, name: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


@dataclass(frozen=True)
class Quiet:
    """lmgate's process and the test's own tasks, counted once no client request is under way."""

    fds: int  # lmgate's open descriptors
    upstream: int  # lmgate's connections to the simulator
    in_flight: float  # requests inside lmgate (its /metrics), queued ones included
    clients: float  # client connections lmgate has open (its /metrics): only the probe's
    tasks: int  # this process's tasks: the simulator's, mostly one per connection from lmgate

    def __str__(self) -> str:
        return (f"{self.fds} fds, {self.upstream} upstream connections, {self.in_flight:.0f} in flight, "
                f"{self.clients:.0f} client connections, {self.tasks} tasks here")


def stacks(tasks: set[asyncio.Task[object]]) -> str:
    """Where each task waits, innermost last: which handler a leftover connection holds up."""
    lines = []
    for task in tasks:
        coro: Any = task.get_coro()
        where = []
        for _ in range(100):
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is None:
                break
            where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        lines.append(" > ".join(where))
    return "\n".join(lines)


async def settled(
    count: Callable[[], Awaitable[Quiet]], ok: Callable[[Quiet], bool], *, timeout_s: float
) -> tuple[bool, Quiet]:
    """Two equal counts in a row that satisfy ``ok`` (True), or the last count after ``timeout_s``
    (False): between a socket closing and its descriptor and task going there is no event to
    await, and idle upstream connections close on their keep-alive expiry."""
    deadline = anyio.current_time() + timeout_s
    previous = None
    for _ in range(1000):
        now = await count()
        if ok(now) and now == previous:
            return True, now
        if anyio.current_time() > deadline:
            return False, now
        previous = now
        await anyio.sleep(0.1)  # a polling period
    raise AssertionError(f"not quiet: {previous}")


def outcome(response: httpx.Response, raw: bytes, *, stream: bool) -> str:
    """served, failed:<code>, or unaccounted (a response the client could not make sense of)."""
    if response.status_code >= 400:
        try:
            return "failed:" + json.loads(raw)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return "unaccounted"
    if stream:
        errors = [event for event in parse_sse(raw) if event.event == "error"]
        if errors:
            error = errors[-1].json()["error"]
            return "failed:" + (error.get("code") or "upstream_error_frame") if isinstance(error, dict) else "failed:upstream_error_frame"
        return "served" if raw.endswith(b"data: [DONE]\n\n") else "unaccounted"
    try:
        return "served" if json.loads(raw)["choices"] else "unaccounted"
    except (ValueError, KeyError, TypeError):
        return "unaccounted"


@pytest.mark.slow
async def test_a_soak_of_mixed_traffic_with_faults_keeps_lmgates_memory_flat_and_accounts_for_every_request(
    lmgate_process, sim, body
):
    upstream: dict[str, object] = {"pool": {"keepalive_expiry_s": KEEPALIVE_S}}
    if TRANSPORT:
        upstream["transport"] = TRANSPORT
    settings = {
        "listen": {"event_loop": LOOP},
        "upstream": upstream,
        "retry": {"backoff_base_s": 0.01},
        "timeouts": {"first_token_s": 1.0, "idle_s": 1.0, "total_s": 10.0},
        "circuit_breaker": {"failure_threshold": 10, "reset_timeout_s": 0.5},
        "concurrency": {"limit": WORKERS, "max_queue": WORKERS},
    }
    limits = httpx.Limits(max_connections=WORKERS * 2, max_keepalive_connections=WORKERS * 2)
    outcomes: Counter[str] = Counter()
    issued = 0
    rng = random.Random(8)
    sim_port = httpx.URL(sim.url).port
    async with lmgate_process(sim.url, settings) as gw, httpx.AsyncClient(timeout=5.0, trust_env=False) as probe:
        pid = gw.process.pid

        async def count() -> Quiet:
            # A request that reaches the upstream: httpx's pool closes expired connections only
            # when it is used.
            await probe.get(gw.url + "/v1/models")
            metrics = (await probe.get(gw.url + "/metrics")).text
            return Quiet(
                fds=len(os.listdir(f"/proc/{pid}/fd")),
                upstream=tcp_peers(pid).count(sim_port),
                in_flight=metric_sum(metrics, "lmgate_requests_in_flight"),
                clients=metric_sum(metrics, "lmgate_client_connections"),
                tasks=len(asyncio.all_tasks()),
            )

        async def one(crowd: httpx.AsyncClient) -> None:
            nonlocal issued
            issued += 1
            kind = rng.random()
            stream = kind < 0.6
            if kind > 0.95:  # bad input: refused before the upstream
                response = await crowd.post(gw.url + CHAT, content=b'{"model": ', headers={"content-type": "application/json"})
                outcomes[outcome(response, response.content, stream=False)] += 1
                return
            model = SLOW if 0.5 < kind < 0.6 else WARM
            async with crowd.stream("POST", gw.url + CHAT, json=body(model, stream=stream)) as response:
                if model == SLOW:  # a client that leaves mid-stream
                    await anext(response.aiter_raw(), b"")
                    outcomes["left"] += 1
                    return
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            outcomes[outcome(response, raw, stream=stream)] += 1

        async def worker(crowd: httpx.AsyncClient, deadline: float) -> None:
            for _ in range(1_000_000):
                if anyio.current_time() >= deadline:
                    return
                try:
                    await one(crowd)
                except httpx.HTTPError as exc:
                    outcomes[f"unaccounted:{type(exc).__name__}"] += 1

        async def inject(deadline: float) -> None:
            for index in range(1_000_000):
                if anyio.current_time() >= deadline:
                    return
                kind, params = FAULTS[index % len(FAULTS)]
                sim.inject_fault(kind, **params)
                await anyio.sleep(0.5)  # the fault rate, not a synchronisation

        samples: list[int] = []

        async def sample(deadline: float) -> None:
            for _ in range(10_000):
                if anyio.current_time() >= deadline:
                    return
                samples.append(rss_bytes(pid))
                await anyio.sleep(SOAK_S / 10)  # a sampling period

        async def run(seconds: float) -> None:
            # A client per phase, closed at its end: the quiet state has no client connection but the probe's.
            deadline = anyio.current_time() + seconds
            async with httpx.AsyncClient(timeout=15.0, trust_env=False, limits=limits) as crowd, anyio.create_task_group() as tg:
                tg.start_soon(inject, deadline)
                tg.start_soon(sample, deadline)
                for _ in range(WORKERS):
                    tg.start_soon(worker, crowd, deadline)
            sim.clear_faults()

        def quiet(now: Quiet) -> bool:
            return now.in_flight == 0 and now.clients <= 1

        await run(min(15.0, SOAK_S / 4))  # warm-up: pools, caches and allocator arenas fill
        warmed, warm = await settled(count, quiet, timeout_s=15)
        assert warmed, f"not quiet after the warm-up: {warm}"
        rss_warm = rss_bytes(pid)
        await run(SOAK_S)
        clean, after = await settled(
            count,
            lambda now: quiet(now) and now.fds <= warm.fds and now.upstream <= warm.upstream and now.tasks <= warm.tasks,
            timeout_s=15,
        )
        rss_end = rss_bytes(pid)
        leftover = "" if clean else stacks(asyncio.all_tasks())
        started = next((r for r in gw.logs() if r.get("event") == "config_loaded"), {})
    served = outcomes["served"]
    print(
        f"\nsoak {SOAK_S:.0f} s, lmgate on {started.get('event_loop')} with transport {TRANSPORT or 'default'}: "
        f"{issued} requests, {served} served; outcomes {dict(outcomes)}; "
        f"lmgate's RSS {rss_warm / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB (samples {[round(r / 2**20, 1) for r in samples]}); "
        f"warm {warm}; after {after}"
    )
    assert clean, f"left behind: before {warm}; after {after}; tasks here:\n{leftover}"
    assert sum(outcomes.values()) == issued
    assert not [name for name in outcomes if name.startswith("unaccounted")], dict(outcomes)
    assert served > issued / 2
    assert rss_end <= rss_warm * 1.10, (rss_warm, rss_end)
