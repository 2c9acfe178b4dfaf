"""gateway/state/breakers.py against a real redis-server, then gateways sharing their circuit.

Two ``SharedState`` clients stand for replicas: failures one of them records open the circuit for
both; after the cool-down both see it half-open, one replica alone (the lease holder) sends the
probes, and their outcome closes or reopens it for both. End to end, two gateways in front of one
scripted upstream: failures through one make the other refuse with ``circuit_open`` without
asking the upstream, and once half-open a single probe reaches it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import serve_gateway
from gateway.config.settings import Config
from gateway.state.breakers import RedisCircuits
from middleware.circuits import BreakerPolicy, CircuitVerdict
from tests.gateway.replicas import replicas as shared_replicas

pytestmark = pytest.mark.anyio

KEY = "upstream"
RESET_S = 0.3


def replicas(url: str, count: int = 2, *, lease_s: float = 5.0, running: bool = True) -> AbstractAsyncContextManager[list[RedisCircuits]]:
    """``count`` replicas' RedisCircuits on the same Redis (each its own client, as separate processes have)."""
    return shared_replicas(url, lambda state: RedisCircuits(state, scope="lmstudio"), count, lease_s=lease_s, running=running)


async def admit(circuits: RedisCircuits, policy: BreakerPolicy) -> CircuitVerdict:
    verdict = await circuits.admit(KEY, policy)
    assert verdict is not None
    return verdict


async def fail(circuits: RedisCircuits, policy: BreakerPolicy, times: int = 1) -> CircuitVerdict | None:
    after = None
    for _ in range(times):
        after = await circuits.record(KEY, await admit(circuits, policy), True, policy)
    return after


async def wait_half_open(circuits: RedisCircuits, policy: BreakerPolicy) -> CircuitVerdict:
    """The cool-down is time itself: wait it out, then ask (bounded)."""
    await anyio.sleep(policy.reset_timeout_s)
    with anyio.fail_after(5):
        while (verdict := await admit(circuits, policy)).state == "open":
            await anyio.sleep(0.02)
    return verdict


async def test_failures_through_one_replica_open_the_circuit_for_all(redis_server):
    policy = BreakerPolicy(failure_threshold=3, reset_timeout_s=30)
    async with replicas(redis_server.url) as (a, b):
        await fail(a, policy, 2)
        assert (await admit(b, policy)).admitted  # two failures: still closed
        after = await fail(a, policy)
        assert after is not None and after.state == "open"
        refused = await admit(b, policy)
        assert (refused.state, refused.admitted) == ("open", False)
        assert 29 < refused.retry_after_s <= 30


async def test_a_success_resets_the_consecutive_failures_for_all(redis_server):
    policy = BreakerPolicy(failure_threshold=2, reset_timeout_s=30)
    async with replicas(redis_server.url) as (a, b):
        await fail(a, policy)
        await b.record(KEY, await admit(b, policy), False, policy)
        after = await fail(a, policy)
        assert after is not None and after.state == "closed"


async def test_the_failure_ratio_counts_every_replicas_outcomes(redis_server):
    policy = BreakerPolicy(failure_threshold=100, failure_ratio=0.5, window_s=60, min_requests=4)
    async with replicas(redis_server.url) as (a, b):
        for replica, failed in ((a, True), (b, False), (b, True)):
            after = await replica.record(KEY, await admit(replica, policy), failed, policy)
            assert after is not None and after.state == "closed"
        after = await fail(a, policy)  # 3 failures of 4 outcomes, on two replicas
        assert after is not None and after.state == "open"


async def test_half_open_one_replica_probes_and_its_success_closes_the_circuit_for_all(redis_server):
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=RESET_S, half_open_max_probes=1)
    async with replicas(redis_server.url) as (a, b):
        await fail(a, policy)
        probe = await wait_half_open(b, policy)
        assert (probe.state, probe.admitted, probe.probe) == ("half_open", True, True)
        # b holds the probe lease: a sheds, and so does b's own second request (one probe at a time).
        for replica in (a, b):
            shed = await admit(replica, policy)
            assert (shed.state, shed.admitted, shed.retry_after_s) == ("half_open", False, 1.0)
        after = await b.record(KEY, probe, False, policy)
        assert after is not None and after.state == "closed"
        assert (await admit(a, policy)).admitted


async def test_a_failed_probe_reopens_the_circuit_for_all(redis_server):
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=RESET_S)
    async with replicas(redis_server.url) as (a, b):
        await fail(a, policy)
        probe = await wait_half_open(a, policy)
        after = await a.record(KEY, probe, True, policy)
        assert after is not None and after.state == "open"
        assert (await admit(b, policy)).state == "open"


async def test_an_outcome_from_before_a_transition_is_ignored(redis_server):
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=30)
    async with replicas(redis_server.url) as (a, b):
        slow = await admit(b, policy)  # admitted while closed, answers late
        await fail(a, policy)
        after = await b.record(KEY, slow, False, policy)
        assert after is not None and after.state == "open"


async def test_a_dead_probers_lease_runs_out_and_another_replica_probes(redis_server):
    lease_s = 0.3
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=RESET_S)
    async with replicas(redis_server.url, 1, lease_s=lease_s, running=False) as (dead,), replicas(
        redis_server.url, 1, lease_s=lease_s
    ) as (alive,):
        await fail(alive, policy)
        assert (await wait_half_open(dead, policy)).probe  # then its process dies mid-probe
        assert not (await admit(alive, policy)).admitted
        with anyio.fail_after(5):
            while not (verdict := await admit(alive, policy)).admitted:
                await anyio.sleep(0.05)
        assert verdict.probe


async def test_without_redis_the_circuit_is_decided_locally(redis_server):
    policy = BreakerPolicy()
    async with replicas(redis_server.url, 1) as (a,):
        redis_server.stop()
        assert await a.admit(KEY, policy) is None
        assert not a.available


# -- two gateways in front of one scripted upstream ---------------------------------------------------


def config(upstream_url: str, redis_url: str) -> Config:
    document: dict[str, Any] = {
        "upstream": {"url": upstream_url},
        "state": {"redis_url": redis_url, "lease_s": 2.0},
        "circuit_breaker": {"failure_threshold": 3, "reset_timeout_s": RESET_S},
        "retry": {"enabled": False},
        "models": {"enabled": False},
    }
    return Config.model_validate(document)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
JSON = [(b"content-type", b"application/json")]


async def test_the_circuit_opens_on_every_gateway_and_one_probe_reaches_the_upstream(redis_server, upstream):
    mode = "fail"
    release = anyio.Event()

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        if mode == "fail":
            await send({"type": "http.response.start", "status": 500, "headers": JSON})
            await send({"type": "http.response.body", "body": b'{"error":"boom"}'})
            return
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": b'{"choices":[]}'})

    upstream.handler = handler

    def posts() -> int:
        return sum(1 for scope, _ in upstream.requests if scope["method"] == "POST")

    async with (
        serve_gateway(config(upstream.url, redis_server.url)) as (a, _),
        serve_gateway(config(upstream.url, redis_server.url)) as (b, gateway_b),
        httpx.AsyncClient(timeout=10.0, trust_env=False) as client,
    ):
        for _ in range(3):
            assert (await client.post(a + "/v1/chat/completions", json=CHAT)).status_code >= 500
        refused = await client.post(b + "/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "circuit_open"
        assert int(refused.headers["retry-after"]) >= 1
        assert posts() == 3  # b refused without asking the upstream
        assert gateway_b.breaker is not None and gateway_b.breaker.state_of() == "open"

        await anyio.sleep(RESET_S)  # the cool-down itself
        mode = "hold"
        statuses: list[int] = []
        everyone_else = anyio.Event()

        async def one(url: str) -> None:
            response = await client.post(url + "/v1/chat/completions", json=CHAT)
            statuses.append(response.status_code)
            if len(statuses) == 5:
                everyone_else.set()

        async with anyio.create_task_group() as tg:
            for url in (a, b, a, b, a, b):
                tg.start_soon(one, url)
            with anyio.fail_after(10):
                await everyone_else.wait()  # five shed while the one probe is held at the upstream
            assert posts() == 4 and sorted(statuses) == [503] * 5
            release.set()
        assert sorted(statuses) == [200] + [503] * 5
        for url in (a, b):  # closed for both
            assert (await client.post(url + "/v1/chat/completions", json=CHAT)).status_code == 200
        assert gateway_b.breaker.state_of() == "closed"
