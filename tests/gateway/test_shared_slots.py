"""gateway/state/slots.py against a real redis-server: two ``SharedState`` clients stand for two replicas.

The limit holds under concurrency, the queue is FIFO across replicas, a holder that dies frees its
slot within the lease (and one that lives keeps it by renewing), a full queue refuses at once, a
waiter that gives up leaves the queue, and a Redis that goes away is reported as unavailable.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import anyio
import pytest

from gateway.state import RedisSlots, StateUnavailable
from middleware.slots import SlotsRefused
from tests.gateway.replicas import replicas as shared_replicas

pytestmark = pytest.mark.anyio

KEY = "*"


def replicas(url: str, count: int = 2, *, lease_s: float = 5.0, running: bool = True) -> AbstractAsyncContextManager[list[RedisSlots]]:
    """``count`` replicas' RedisSlots on the same Redis (each its own client, as separate processes have)."""
    return shared_replicas(url, lambda state: RedisSlots(state), count, lease_s=lease_s, running=running)


async def queued(slots: RedisSlots) -> int:
    return int(await slots.state.run(lambda r: r.zcard(slots.keys(KEY)[1])))


async def wait_queued(slots: RedisSlots, count: int) -> None:
    """Bounded poll of Redis until ``count`` requests wait (other tasks' progress, not the test's logic)."""
    with anyio.fail_after(10):
        while await queued(slots) != count:
            await anyio.sleep(0.005)


async def test_the_limit_holds_across_replicas_under_concurrency(redis_server):
    limit, requests = 3, 24
    async with replicas(redis_server.url) as (a, b):
        in_use = peak = served = 0

        async def one(slots: RedisSlots) -> None:
            nonlocal in_use, peak, served
            lease = await slots.acquire(KEY, limit=limit, max_queue=requests)
            in_use += 1
            peak = max(peak, in_use)
            await anyio.sleep(0.01)  # hold the slot a moment: the work a request would do
            in_use -= 1
            served += 1
            await lease.release(0.01)

        async with anyio.create_task_group() as tg:
            for n in range(requests):
                tg.start_soon(one, (a, b)[n % 2])
    assert peak == limit and served == requests
    assert a.pressure(KEY) is not None


async def test_waiters_are_served_in_arrival_order_across_replicas(redis_server):
    async with replicas(redis_server.url) as (a, b):
        holder = await a.acquire(KEY, limit=1, max_queue=10)
        order: list[str] = []
        async with anyio.create_task_group() as tg:

            async def wait(name: str, slots: RedisSlots) -> None:
                lease = await slots.acquire(KEY, limit=1, max_queue=10)
                order.append(name)
                await lease.release(0.0)

            arrivals = [("a1", a), ("b1", b), ("a2", a), ("b2", b), ("a3", a)]
            for position, (name, slots) in enumerate(arrivals, start=1):
                tg.start_soon(wait, name, slots)
                await wait_queued(a, position)  # each joins the queue before the next arrives
            await holder.release(0.0)
    assert order == [name for name, _ in arrivals]


async def test_a_dead_replicas_slot_comes_back_within_the_lease(redis_server):
    lease_s = 0.3
    # Not running: no renewals, as from a replica killed with SIGKILL while holding the slot.
    async with replicas(redis_server.url, 1, lease_s=lease_s, running=False) as (dead,), replicas(
        redis_server.url, 1, lease_s=lease_s
    ) as (alive,):
        await dead.acquire(KEY, limit=1, max_queue=10)
        started = anyio.current_time()
        with anyio.fail_after(10):
            lease = await alive.acquire(KEY, limit=1, max_queue=10)
        waited = anyio.current_time() - started
        await lease.release(0.0)
    assert waited >= lease_s * 0.5  # it did wait for the lease to run out (Redis's clock, not ours)


async def test_a_live_holder_keeps_its_slot_past_the_lease_by_renewing_it(redis_server):
    lease_s = 0.3
    async with replicas(redis_server.url, lease_s=lease_s) as (a, b):
        held = await a.acquire(KEY, limit=1, max_queue=10)
        with anyio.move_on_after(lease_s * 4) as waited:  # four leases: renewed every lease / 3
            await b.acquire(KEY, limit=1, max_queue=10)
        assert waited.cancelled_caught
        assert await queued(b) == 0  # the cancelled waiter left the queue
        await held.release(lease_s * 4)
        with anyio.fail_after(5):
            lease = await b.acquire(KEY, limit=1, max_queue=10)
        await lease.release(0.0)


async def test_a_full_queue_refuses_at_once_with_the_shared_figures(redis_server):
    async with replicas(redis_server.url) as (a, b):
        first = await a.acquire(KEY, limit=1, max_queue=1)
        await first.release(2.0)  # one hold of 2 s: Retry-After has a figure from now on
        holder = await a.acquire(KEY, limit=1, max_queue=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: a.acquire(KEY, limit=1, max_queue=1))
            await wait_queued(a, 1)
            with pytest.raises(SlotsRefused) as refused:
                await b.acquire(KEY, limit=1, max_queue=1)
            tg.cancel_scope.cancel()
        await holder.release(0.0)
    pressure = refused.value.pressure
    assert (pressure.in_flight, pressure.queued) == (1, 1)
    assert pressure.hold_s == pytest.approx(2.0)


async def test_keys_are_separate_semaphores(redis_server):
    async with replicas(redis_server.url, 1) as (a,):
        one = await a.acquire("model-a", limit=1, max_queue=0)
        other = await a.acquire("model-b", limit=1, max_queue=0)
        with pytest.raises(SlotsRefused):
            await a.acquire("model-a", limit=1, max_queue=0)
        await one.release(0.0)
        await other.release(0.0)


async def test_redis_going_away_is_reported_as_unavailable_and_slots_are_shared_again_after(redis_server):
    async with replicas(redis_server.url, 1) as (a,):
        redis_server.stop()
        with pytest.raises(StateUnavailable):
            await a.acquire(KEY, limit=1, max_queue=1)
        assert not a.available
        redis_server.start()  # empty: a Redis without persistence comes back with no slots taken
        with anyio.fail_after(10):
            while not a.available:
                await anyio.sleep(0.01)
        lease = await a.acquire(KEY, limit=1, max_queue=1)
        await lease.release(0.0)
