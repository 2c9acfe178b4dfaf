"""gateway/state/store.py against a real redis-server: bounded calls, the available flag, its probe.

Redis is stopped and started again under a running ``SharedState``; the transitions must be
logged once each and noticed by the probe, never by a request paying a timeout after another.
"""

from __future__ import annotations

import logging

import anyio
import pytest

from gateway.config.settings import ConfigError, load_config
from gateway.state import SharedState, StateUnavailable

pytestmark = pytest.mark.anyio


def shared(url: str, **options: float) -> SharedState:
    settings = {"timeout_s": 0.2, "lease_s": 1.0, "probe_interval_s": 0.05, **options}
    return SharedState(url, **settings)  # type: ignore[arg-type]


async def wait_until(check, *, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Bounded poll of state another party changes (the probe's view of Redis)."""
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


def transitions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.event for r in caplog.records if r.name == "lmgate.state" and hasattr(r, "event")]  # type: ignore[attr-defined]


async def test_calls_run_on_redis_and_keys_carry_the_prefix(redis_server):
    state = SharedState(redis_server.url, timeout_s=0.2, lease_s=1.0, key_prefix="blue")
    async with state.running():
        key = state.key("probe", "x")
        await state.run(lambda r: r.set(key, b"1", px=5000))
        assert await state.run(lambda r: r.get(key)) == b"1"
        assert key == "blue:probe:x"
        script = state.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        assert await script([state.key("n")], [5]) == 5
    assert state.available


async def test_redis_down_is_noticed_logged_once_and_left_when_it_answers_again(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="lmgate.state")
    state = shared(redis_server.url)
    changes: list[bool] = []
    state.on_change(changes.append)
    async with state.running():
        assert state.available and transitions(caplog) == ["state_available"]
        redis_server.stop()
        with pytest.raises(StateUnavailable):
            await state.run(lambda r: r.ping())
        assert not state.available
        # Known down: the next calls fail at once, without asking Redis (and without logging).
        for _ in range(3):
            with pytest.raises(StateUnavailable):
                await state.run(lambda r: r.ping())
        redis_server.start()
        await wait_until(lambda: state.available)
        assert await state.run(lambda r: r.ping())
    assert changes == [False, True]
    assert transitions(caplog) == ["state_available", "state_unavailable", "state_available"]
    assert state.unavailable_total == 1


async def test_the_probe_notices_redis_going_away_while_idle(redis_server):
    state = shared(redis_server.url)
    async with state.running():
        redis_server.stop()
        await wait_until(lambda: not state.available)
        assert state.snapshot()["available"] is False and state.snapshot()["last_error"]


async def test_an_unreachable_redis_at_start_up_is_logged_once_and_found_when_it_starts(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="lmgate.state")
    redis_server.stop()
    state = shared(redis_server.url)
    async with state.running():
        assert not state.available
        with pytest.raises(StateUnavailable):
            await state.run(lambda r: r.ping())
        redis_server.start()
        await wait_until(lambda: state.available)
    assert transitions(caplog) == ["state_unavailable", "state_available"]


async def test_a_redis_that_does_not_answer_fails_the_call_at_its_deadline_and_is_found_again(redis_server):
    state = shared(redis_server.url, timeout_s=0.05)
    async with state.running():
        redis_server.pause()  # connected, silent
        try:
            with anyio.fail_after(5):  # a bound on the test, not a budget: the call's own deadline ends it
                with pytest.raises(StateUnavailable):
                    await state.run(lambda r: r.ping())
            assert not state.available
        finally:
            redis_server.resume()
        await wait_until(lambda: state.available)
        assert await state.run(lambda r: r.ping())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:6379", "expected a redis://, rediss:// or unix:// URL"),
        ("redis://", "expected a host"),
        ("redis://127.0.0.1:port/0", "expected a numeric port"),
        ("redis://127.0.0.1:6379/zero", "expected a database number"),
        ("unix://", "expected a socket path"),
    ],
)
def test_a_bad_redis_url_fails_at_start_up_naming_the_key(url, expected):
    with pytest.raises(ConfigError) as failure:
        load_config(env={"LMGATE_STATE__REDIS_URL": url})
    assert "environment variable LMGATE_STATE__REDIS_URL: state.redis_url:" in str(failure.value)
    assert expected in str(failure.value)


def test_the_redis_password_is_never_shown():
    config = load_config(env={"LMGATE_STATE__REDIS_URL": "redis://user:hunter2@127.0.0.1:6379/0"})
    assert "hunter2" not in str(config.redacted())
    with pytest.raises(ConfigError) as failure:
        load_config(env={"LMGATE_STATE__REDIS_URL": "redis://user:hunter2@127.0.0.1:port/0"})
    assert "hunter2" not in str(failure.value)


def test_without_redis_url_there_is_no_shared_state():
    assert SharedState.from_config(load_config(env={}).state) is None
