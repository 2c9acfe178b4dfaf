"""ConcurrencyMiddleware with shared slots: how it uses a ``SharedSlots`` store and falls back to local limits.

The store here is a small in-memory stand-in for the Redis one (tests/gateway/test_shared_slots.py
tests that against a real redis-server; tests/deploy/test_nginx_shared_state.py the whole); what is
under test is the middleware's side: the fast path, the refusal's Retry-After from the shared
figures, and the fallback share, counting requests that still hold shared slots.
"""

from __future__ import annotations

import json

import anyio
import pytest

from middleware.concurrency import ConcurrencyMiddleware
from middleware.slots import SharedPressure, SlotsRefused, SlotsUnavailable
from middleware.types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio


class StubLease:
    def __init__(self, store: StubSlots) -> None:
        self.store = store

    async def release(self, held_s: float) -> None:
        self.store.in_use -= 1
        self.store.released += 1


class StubSlots:
    """Slots counted in memory as the store would count them; ``fail``/``refuse`` script its answers."""

    def __init__(self) -> None:
        self.available = True
        self.in_use = 0
        self.released = 0
        self.fail = False
        self.refuse: SharedPressure | None = None
        self.calls: list[int] = []  # the max_queue of each acquire

    async def acquire(self, key: str, *, limit: int, max_queue: int) -> StubLease:
        self.calls.append(max_queue)
        if self.fail:
            self.available = False
            raise SlotsUnavailable("gone")
        if self.refuse is not None:
            raise SlotsRefused(self.refuse)
        if self.in_use < limit:
            self.in_use += 1
            return StubLease(self)
        if max_queue == 0:
            raise SlotsRefused(SharedPressure(in_flight=self.in_use, queued=0, hold_s=None))
        await anyio.sleep_forever()
        raise AssertionError

    def pressure(self, key: str) -> SharedPressure | None:
        return SharedPressure(in_flight=self.in_use, queued=0, hold_s=None)


class Call:
    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.scope: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        self.delivered = False

    async def receive(self) -> Message:
        if not self.delivered:
            self.delivered = True
            return {"type": "http.request", "body": json.dumps({"model": "m"}).encode(), "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None


class Held:
    """An app whose requests run until ``go`` is set."""

    def __init__(self) -> None:
        self.running = 0
        self.go = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.running += 1
        await self.go.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def run_all(app: ConcurrencyMiddleware, held: Held, count: int) -> list[Call]:
    calls = [Call() for _ in range(count)]
    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(app, call.scope, call.receive, call.send)
            await anyio.wait_all_tasks_blocked()
        held.go.set()
    return calls


async def test_a_free_shared_slot_is_taken_in_one_call_and_given_back():
    store, held = StubSlots(), Held()
    app = ConcurrencyMiddleware(held, limit=4, max_queue=4, shared=store)
    calls = await run_all(app, held, 3)
    assert [c.status for c in calls] == [200] * 3
    assert store.calls == [0, 0, 0]  # the fast path: never queued, one call each
    assert store.released == 3 and store.in_use == 0


async def test_with_the_store_down_a_replica_admits_its_share_of_the_limit():
    store, held = StubSlots(), Held()
    store.available = False
    app = ConcurrencyMiddleware(held, limit=4, max_queue=0, shared=store, fallback_limit_share=0.5)
    calls = await run_all(app, held, 3)
    assert [c.status for c in calls] == [200, 200, 503]
    assert store.calls == []  # known down: not asked


async def test_requests_holding_shared_slots_count_against_the_fallback_share():
    store, held = StubSlots(), Held()
    app = ConcurrencyMiddleware(held, limit=4, max_queue=0, shared=store, fallback_limit_share=0.5)
    calls = [Call() for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for call in calls[:2]:
            tg.start_soon(app, call.scope, call.receive, call.send)
        await anyio.wait_all_tasks_blocked()
        assert held.running == 2 and store.in_use == 2
        store.available = False  # Redis goes away while both run on shared slots
        tg.start_soon(app, calls[2].scope, calls[2].receive, calls[2].send)
        await anyio.wait_all_tasks_blocked()
        assert calls[2].status == 503  # two shared holders already fill a share of 2
        held.go.set()
    assert [c.status for c in calls[:2]] == [200, 200] and store.released == 2


async def test_a_store_failing_on_the_way_falls_back_to_local_limits():
    store, held = StubSlots(), Held()
    store.fail = True
    app = ConcurrencyMiddleware(held, limit=4, max_queue=0, shared=store, fallback_limit_share=0.5)
    calls = await run_all(app, held, 3)
    assert [c.status for c in calls] == [200, 200, 503]
    assert store.calls == [0]  # failed once, then known down


async def test_a_full_shared_queue_is_refused_with_retry_after_from_the_shared_figures():
    store, held = StubSlots(), Held()
    store.refuse = SharedPressure(in_flight=4, queued=3, hold_s=10.0)
    app = ConcurrencyMiddleware(held, limit=4, max_queue=3, shared=store)
    (call,) = await run_all(app, held, 1)
    assert call.status == 503
    # Three waiting plus this one, served 4 at a time, each slot held 10 s on average.
    assert dict(call.sent[0]["headers"])[b"retry-after"] == b"10"
    assert held.running == 0
