"""The clocks, the counters' wait_for and deterministic text: the simulator's small parts."""

from __future__ import annotations

import anyio
import pytest

from gateway.simulator import Counters, FakeClock, RealClock
from gateway.simulator.clock import sleep, wait_event_until
from gateway.simulator.text import count_tokens, make_id, pieces, request_key

pytestmark = pytest.mark.anyio


async def test_a_fake_clock_wakes_sleepers_in_deadline_order():
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append(f"{name}@{clock.now()}")

    async with anyio.create_task_group() as tg:
        for name, deadline in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("late", 10.0)):
            tg.start_soon(sleeper, name, deadline)
        await anyio.wait_all_tasks_blocked()
        assert clock.sleepers == 4
        clock.advance(2.5)
        await anyio.wait_all_tasks_blocked()
        assert woke == ["a@2.5", "b@2.5"] and clock.sleepers == 2
        clock.advance(10.0)
    assert woke == ["a@2.5", "b@2.5", "c@12.5", "late@12.5"]


async def test_a_past_deadline_returns_at_once_and_time_never_goes_back():
    clock = FakeClock(start=5.0)
    await clock.sleep_until(4.0)
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    assert clock.wall() == 1_700_000_000.0


async def test_wait_event_until_reports_which_came_first():
    clock = FakeClock()
    event = anyio.Event()
    results: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _record(results, wait_event_until(clock, event, 5.0)))
        await anyio.wait_all_tasks_blocked()
        clock.advance(5.0)
    event.set()
    assert results == [False]
    assert await wait_event_until(clock, event, 1.0) is True


async def _record(results: list[bool], waiting) -> None:  # type: ignore[no-untyped-def]
    results.append(await waiting)


async def test_a_real_clock_can_run_faster():
    clock = RealClock(speed=1000)
    before = clock.now()
    with anyio.fail_after(1.0):
        await sleep(clock, 5.0)  # 5 ms of real time
    assert clock.now() - before >= 5.0
    with pytest.raises(ValueError):
        RealClock(speed=0)


async def test_counters_wait_for_wakes_on_change_and_times_out():
    counters = Counters()
    async with anyio.create_task_group() as tg:
        tg.start_soon(counters.wait_for, lambda c: c.loads_completed == 2)
        await anyio.wait_all_tasks_blocked()
        counters.loads_completed += 1
        counters.loads_completed += 1
    with pytest.raises(TimeoutError):
        await counters.wait_for(lambda c: c.evictions == 1, timeout=0.01)
    snapshot = counters.snapshot()
    snapshot["tokens_before_cancel"].append(1)
    assert counters.tokens_before_cancel == [] and snapshot["loads_completed"] == 2


def test_text_is_deterministic_and_tokens_are_four_characters():
    key = request_key(0, "/v1/chat/completions", {"messages": [], "stream": True, "ttl": 5})
    assert key == request_key(0, "/v1/chat/completions", {"messages": []})
    assert key != request_key(1, "/v1/chat/completions", {"messages": []})
    assert pieces(key, "content", 5) == pieces(key, "content", 5)
    assert not pieces(key, "content", 5)[0].startswith(" ") and pieces(key, "content", 5)[1].startswith(" ")
    assert make_id(key, "chatcmpl-").startswith("chatcmpl-") and len(make_id(key, "x")) == 22
    assert [count_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
