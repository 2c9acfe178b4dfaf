"""middleware.disconnect: one watcher for clients that leave, no ExceptionGroup out."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from middleware.disconnect import DISCONNECT_EXTENSION, DisconnectSignal, cancel_on_disconnect, run_beside
from middleware.types import Message, Receive

pytestmark = pytest.mark.anyio

BODY: Message = {"type": "http.request", "body": b"{}", "more_body": False}


def channel(*messages: Message, then: anyio.Event | None = None) -> Receive:
    """A server's receive: ``messages``, then ``http.disconnect`` once ``then`` is set (never without it)."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then is None:
            await anyio.sleep_forever()
        else:
            await then.wait()
        return {"type": "http.disconnect"}

    return receive


async def test_a_disconnect_cancels_the_block_and_is_reported() -> None:
    leave = anyio.Event()
    reached_the_end = False
    with anyio.fail_after(5):
        async with cancel_on_disconnect(channel(BODY, then=leave)) as watch:
            leave.set()
            await anyio.sleep_forever()
            reached_the_end = True
    assert watch.disconnected and not reached_the_end


async def test_a_block_that_ends_first_stops_the_watch() -> None:
    async with cancel_on_disconnect(channel(BODY)) as watch:
        await anyio.lowlevel.checkpoint()
    assert not watch.disconnected


async def test_the_blocks_exception_comes_out_as_itself() -> None:
    with pytest.raises(ValueError, match="from the block"):
        async with cancel_on_disconnect(channel()):
            raise ValueError("from the block")


async def test_a_failing_receive_ends_the_block_with_its_own_exception() -> None:
    async def broken() -> Message:
        raise OSError("the channel broke")

    with anyio.fail_after(5), pytest.raises(OSError, match="the channel broke"):
        async with cancel_on_disconnect(broken):
            await anyio.sleep_forever()


async def test_an_outer_cancellation_goes_through() -> None:
    with anyio.move_on_after(0.01) as outer:
        async with cancel_on_disconnect(channel()) as watch:
            await anyio.sleep_forever()
    assert outer.cancelled_caught and not watch.disconnected


def signalled() -> tuple[DisconnectSignal, dict[str, object]]:
    signal = DisconnectSignal()
    return signal, {"type": "http", "extensions": {DISCONNECT_EXTENSION: signal}}


async def test_a_servers_signal_cancels_the_block_without_reading_receive() -> None:
    signal, scope = signalled()

    async def never_read() -> Message:
        raise AssertionError("with a signal, nothing reads receive()")

    reached_the_end = False
    with anyio.fail_after(5):
        async with cancel_on_disconnect(never_read, scope=scope) as watch:
            asyncio.get_running_loop().call_soon(signal.set)
            await anyio.sleep_forever()
            reached_the_end = True
    assert watch.disconnected and not reached_the_end


async def test_a_signal_set_before_the_watch_cancels_the_block_at_once() -> None:
    signal, scope = signalled()
    signal.set()
    with anyio.fail_after(5):
        async with cancel_on_disconnect(channel(), scope=scope) as watch:
            await anyio.sleep_forever()
    assert watch.disconnected


async def test_with_a_signal_the_blocks_exception_and_an_outer_cancellation_go_through() -> None:
    signal, scope = signalled()
    with pytest.raises(ValueError, match="from the block"):
        async with cancel_on_disconnect(channel(), scope=scope):
            raise ValueError("from the block")
    with anyio.move_on_after(0.01) as outer:
        async with cancel_on_disconnect(channel(), scope=scope) as watch:
            await anyio.sleep_forever()
    assert outer.cancelled_caught and not watch.disconnected
    signal.set()  # after the block: the watch is gone and nothing is cancelled
    assert not watch.disconnected


async def test_run_beside_runs_a_task_for_the_length_of_the_block() -> None:
    ticks = 0
    tick = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            tick.set()
            await anyio.lowlevel.checkpoint()

    async with run_beside(ticker):
        await tick.wait()
    seen = ticks
    await anyio.lowlevel.checkpoint()
    assert seen >= 1 and ticks == seen


async def test_run_beside_lets_the_blocks_exception_out_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with run_beside(anyio.sleep_forever):
            raise KeyError("x")
