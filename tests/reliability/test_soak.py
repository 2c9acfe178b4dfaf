"""A bounded soak: minutes of mixed traffic with faults injected all along.

Every request is accounted for (served, or failed with an error code the client could read: an
OpenAI error body or an SSE error frame, or left on purpose by the client); memory stays flat
within 10% after the warm-up; no task, descriptor or upstream connection is left behind.
``LMGATE_SOAK_S`` sets the length (default 120 s); ``LMGATE_SOAK_TRANSPORT`` the upstream transport
(``aiohttp`` or ``httpx``; default: ``upstream.transport``'s default); the figures are printed at the end.
"""

from __future__ import annotations

import gc
import json
import os
import random
from collections import Counter

import anyio
import httpx
import pytest

from gateway.simulator.testing import parse_sse

pytestmark = pytest.mark.anyio

SOAK_S = float(os.environ.get("LMGATE_SOAK_S", "120"))
TRANSPORT = os.environ.get("LMGATE_SOAK_TRANSPORT")  # None: the configured default
WORKERS = 16
CHAT = "/v1/chat/completions"
WARM, SLOW = "qwen2.5-7b-instruct", "slow-7b"
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


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


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
async def test_a_soak_of_mixed_traffic_with_faults_keeps_memory_flat_and_accounts_for_every_request(
    start_gateway, leaks_of, sim, body
):
    sections = {
        "timeouts": {"first_token_s": 1.0, "idle_s": 1.0, "total_s": 10.0},
        "circuit_breaker": {"failure_threshold": 10, "reset_timeout_s": 0.5},
        "concurrency": {"limit": WORKERS, "max_queue": WORKERS},
    }
    if TRANSPORT:
        sections["upstream"] = {"transport": TRANSPORT}
    limits = httpx.Limits(max_connections=WORKERS * 2, max_keepalive_connections=WORKERS * 2)
    outcomes: Counter[str] = Counter()
    issued = 0
    rng = random.Random(8)
    async with start_gateway(sim.url, **sections) as gw, httpx.AsyncClient(
        timeout=15.0, trust_env=False, limits=limits
    ) as crowd:
        leaks = leaks_of(gw, crowd)

        async def one() -> None:
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

        async def worker(deadline: float) -> None:
            for _ in range(1_000_000):
                if anyio.current_time() >= deadline:
                    return
                try:
                    await one()
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
                samples.append(rss_bytes())
                await anyio.sleep(SOAK_S / 10)  # a sampling period

        async def run(seconds: float) -> None:
            deadline = anyio.current_time() + seconds
            async with anyio.create_task_group() as tg:
                tg.start_soon(inject, deadline)
                tg.start_soon(sample, deadline)
                for _ in range(WORKERS):
                    tg.start_soon(worker, deadline)
            sim.clear_faults()

        await run(min(15.0, SOAK_S / 4))  # warm-up: pools, caches and allocator arenas fill
        gc.collect()
        warm = await leaks.baseline()
        rss_warm = rss_bytes()
        await run(SOAK_S)
        gc.collect()
        rss_end = rss_bytes()
        after = await leaks.assert_none(timeout_s=15)
    served = outcomes["served"]
    print(
        f"\nsoak {SOAK_S:.0f} s on {type(gw.app.client._transport).__name__}: {issued} requests, {served} served; outcomes {dict(outcomes)}; "
        f"RSS {rss_warm / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB (samples {[round(r / 2**20, 1) for r in samples]}); "
        f"warm {warm}; after {after}"
    )
    assert sum(outcomes.values()) == issued
    assert not [name for name in outcomes if name.startswith("unaccounted")], dict(outcomes)
    assert served > issued / 2
    assert rss_end <= rss_warm * 1.10, (rss_warm, rss_end)
