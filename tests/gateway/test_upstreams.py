"""Several upstreams end to end: three LM Studio simulators on real sockets, lmgate in front.

Each simulator has different models loaded and different load times (all sub-second); the
simulators' own counters prove where requests and loads went, and ``X-Lmgate-Upstream`` says it to
the client. Slots are held open with the simulator's ``hang_*`` faults, so "this upstream is full"
is a fact the test creates, not a race it hopes to win (docs/upstreams.md has the rules).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx
import openai
import pytest

from gateway.app import Gateway, serve_gateway
from gateway.config.settings import Config
from gateway.simulator import SimModel, SimSettings, Simulator
from gateway.simulator.testing import BackgroundStream
from gateway.upstreams.router import Router

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Where is my model warm?"}]
FAST = {"tokens_per_second": float("inf"), "ttft_base_s": 0.0, "ttft_per_prompt_token_s": 0.0}
POST_CHAT = "POST /v1/chat/completions"


def model(model_id: str, *, loaded: bool = False, load_delay_s: float = 0.2, **extra: Any) -> SimModel:
    return SimModel(id=model_id, loaded=loaded, load_delay_s=load_delay_s, **{**FAST, **extra})


def chat(model_id: str, **extra: Any) -> dict[str, Any]:
    return {"model": model_id, "messages": MESSAGES, "max_tokens": 8, **extra}


@asynccontextmanager
async def simulators(*catalogues: list[SimModel], settings: SimSettings | None = None) -> AsyncIterator[list[Simulator]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Simulator(models=c, settings=settings)) for c in catalogues]


@asynccontextmanager
async def lmgate(
    upstreams: dict[str, str], *, limits: dict[str, dict[str, Any]] | None = None, **sections: dict[str, Any]
) -> AsyncIterator[tuple[str, Gateway]]:
    """lmgate in front of ``upstreams`` (name -> URL, in that order); ``limits``: name -> its concurrency."""
    document: dict[str, Any] = {
        "upstreams": [
            {"name": name, "url": url, **({"concurrency": limits[name]} if limits and name in limits else {})}
            for name, url in upstreams.items()
        ],
        "models": {"heartbeat_s": 0.1},
    }
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    async with serve_gateway(Config.model_validate(document)) as served:
        yield served


def named(*sims: Simulator) -> dict[str, str]:
    return {name: sim.url for name, sim in zip("abc", sims, strict=False)}


def router_of(gateway: Gateway) -> Router:
    router = gateway.stack.router
    assert router is not None
    return router


def dead_url() -> str:
    """A 127.0.0.1 URL where nothing listens (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for gateway-side state no event announces (a queue's length): a bounded poll."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


class Wire:
    """The network between lmgate and one simulator: a TCP relay on a fixed 127.0.0.1 port.

    :meth:`cut` drops every connection at once and stops listening, which is what lmgate sees when
    the machine or its LM Studio dies. (Exiting a simulator's context is a graceful stop instead:
    hypercorn answers each request it still holds with an empty 500.) A new wire on the same
    ``port`` in front of a new simulator is the restart.
    """

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port, self.port = target_port, port
        self._life = anyio.CancelScope()
        self._dead = anyio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._life:
                async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port) as listener:
                    self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
                    task_status.started()
                    await listener.serve(self._relay)
        finally:
            self._dead.set()

    async def _relay(self, downstream: anyio.abc.SocketStream) -> None:
        async with downstream, await anyio.connect_tcp("127.0.0.1", self.target_port) as upstream:

            async def pipe(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
                async for chunk in source:
                    await sink.send(chunk)
                tg.cancel_scope.cancel()  # one side closed: close both

            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, downstream, upstream)
                tg.start_soon(pipe, upstream, downstream)

    async def cut(self) -> None:
        self._life.cancel()
        await self._dead.wait()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


async def post_all(client: httpx.AsyncClient, url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body at once; the answers in the order of ``bodies``."""
    answers: dict[int, httpx.Response] = {}

    async def one(index: int, body: dict[str, Any]) -> None:
        answers[index] = await client.post(url + CHAT, json=body)

    async with anyio.create_task_group() as tg:
        for index, body in enumerate(bodies):
            tg.start_soon(one, index, body)
    return [answers[index] for index in range(len(bodies))]


@asynccontextmanager
async def holding(client: httpx.AsyncClient, url: str, sim: Simulator, model_id: str) -> AsyncIterator[BackgroundStream]:
    """One streaming request that takes a slot on ``sim`` and keeps it (headers sent, then silence)
    until the block ends and the client hangs up."""
    sim.inject_fault("hang_after_headers", model=model_id)
    holder = BackgroundStream(client, url + CHAT, chat(model_id, stream=True))
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.run)
        with anyio.fail_after(5):
            await holder.started.wait()
        try:
            yield holder
        finally:
            holder.hang_up()


# --- 1. each request goes where its model is warm -------------------------------------------------


async def test_each_request_goes_to_the_upstream_where_its_model_is_loaded(client):
    def catalogue(warm: str, load_delay_s: float) -> list[SimModel]:
        return [model(m, loaded=m == warm, load_delay_s=load_delay_s) for m in ("alpha", "beta", "gamma")]

    async with (
        simulators(catalogue("alpha", 0.3), catalogue("beta", 0.2), catalogue("gamma", 0.1)) as (a, b, c),
        lmgate(named(a, b, c)) as (url, gateway),
    ):
        answers = [await client.post(url + CHAT, json=chat(m)) for m in ("alpha", "beta", "gamma", "beta", "beta")]
        streamed = await client.post(url + CHAT, json=chat("gamma", stream=True))

    assert [r.status_code for r in answers] == [200] * 5 and streamed.status_code == 200
    assert [r.headers["x-lmgate-upstream"] for r in answers] == ["a", "b", "c", "b", "b"]
    assert [r.json()["model"] for r in answers] == ["alpha", "beta", "gamma", "beta", "beta"]
    assert {r.headers["x-lmgate-model-state"] for r in answers} == {"warm"}
    assert streamed.headers["x-lmgate-upstream"] == "c" and streamed.text.endswith("data: [DONE]\n\n")
    # The simulators' own counts: nothing loaded anywhere, each generation where its model is.
    assert [s.counters.loads_started for s in (a, b, c)] == [0, 0, 0]
    assert [s.counters.generations_started for s in (a, b, c)] == [1, 3, 2]
    assert [s.counters.routes.get(POST_CHAT, 0) for s in (a, b, c)] == [1, 3, 2]
    assert router_of(gateway).stats.chosen == {"warm": 6}


async def test_of_two_upstreams_where_the_model_is_warm_the_less_busy_one_serves(client):
    async with (
        simulators([model("alpha", loaded=True)], [model("alpha", loaded=True)], [model("beta", loaded=True)]) as (a, b, c),
        lmgate(named(a, b, c)) as (url, gateway),
        holding(client, url, a, "alpha") as holder,  # equal and idle: the first in config order
    ):
        assert holder.response_headers is not None and holder.response_headers["x-lmgate-upstream"] == "a"
        answers = [await client.post(url + CHAT, json=chat("alpha")) for _ in range(3)]
    assert [r.headers["x-lmgate-upstream"] for r in answers] == ["b"] * 3
    assert (a.counters.generations_started, b.counters.generations_started, c.counters.requests) == (0, 3, 0)


# --- 2. a model loaded nowhere: one load, on one upstream, for every waiting request -------------


async def test_eight_concurrent_requests_for_a_model_loaded_nowhere_load_it_once_on_one_upstream(client):
    race = SimSettings(duplicate_instance_race=True)  # each simulator would load an instance per JIT request
    async with (
        simulators(
            [model("alpha", loaded=True), model("cold", load_delay_s=0.3)],
            [model("beta", loaded=True), model("cold", load_delay_s=0.2)],
            [model("cold", load_delay_s=0.4)],  # nothing loaded there: the rule picks it
            settings=race,
        ) as (a, b, c),
        lmgate(named(a, b, c)) as (url, gateway),
    ):
        answers = await post_all(client, url, [chat("cold")] * 8)

    assert [r.status_code for r in answers] == [200] * 8
    assert {r.headers["x-lmgate-upstream"] for r in answers} == {"c"}
    assert sum(s.counters.loads_started for s in (a, b, c)) == 1 and c.counters.loads_completed == 1
    assert c.counters.instances == {"cold": 1}
    assert (a.counters.requests, b.counters.requests, c.counters.generations_started) == (0, 0, 8)
    chosen = router_of(gateway).stats.chosen
    assert chosen["load"] == 1 and chosen["load"] + chosen["join"] + chosen["warm"] == 8


# --- 3. a full upstream spills to another only when a load is known to be shorter than the wait --


async def test_a_full_upstream_queues_when_the_wait_is_shorter_than_the_measured_load(client):
    async with (
        simulators(
            [model("big", load_delay_s=0.5)],  # nothing loaded: the first request loads it here
            [model("other", loaded=True), model("big", load_delay_s=0.5)],
            [model("other", loaded=True)],
        ) as (a, b, c),
        lmgate(named(a, b, c), limits={"a": {"limit": 1, "max_queue": 8}}) as (url, gateway),
    ):
        first = await client.post(url + CHAT, json=chat("big"))  # measures the load (0.5 s)
        again = await client.post(url + CHAT, json=chat("big"))  # measures a slot's hold (milliseconds)
        assert (first.headers["x-lmgate-upstream"], first.headers["x-lmgate-model-state"]) == ("a", "cold")
        assert (again.headers["x-lmgate-upstream"], again.headers["x-lmgate-model-state"]) == ("a", "warm")
        limiter = gateway.stack.upstreams["a"].concurrency
        assert limiter is not None
        async with anyio.create_task_group() as tg, holding(client, url, a, "big"):
            answers: list[httpx.Response] = []

            async def queued() -> None:
                answers.append(await client.post(url + CHAT, json=chat("big")))

            for _ in range(3):
                tg.start_soon(queued)
            await eventually(lambda: limiter.pressure().queued == 3)
            # A few milliseconds of queue against half a second of load: they wait for a.
            assert b.counters.loads_started == 0 and router_of(gateway).stats.second_instances == 0
        # The holder hung up; the queue drained on a.

    assert [r.status_code for r in answers] == [200] * 3
    assert {r.headers["x-lmgate-upstream"] for r in answers} == {"a"}
    assert (a.counters.loads_started, b.counters.loads_started, b.counters.requests) == (1, 0, 0)
    assert router_of(gateway).stats.chosen["queue"] == 3


@pytest.mark.parametrize("measured", [True, False], ids=["load-time-measured", "load-time-unknown"])
async def test_a_full_upstream_spills_a_second_instance_only_when_a_load_is_known_to_be_shorter(client, caplog, measured):
    caplog.set_level(logging.WARNING, logger="lmgate.routing")
    async with (
        simulators(
            [model("big", loaded=True)],
            [model("big", load_delay_s=0.1)],
            [model("other", loaded=True)],  # does not have the model at all
        ) as (a, b, c),
        lmgate(named(a, b, c), limits={"a": {"limit": 1, "max_queue": 8}}) as (url, gateway),
    ):
        if measured:  # load it once on b (0.1 s, now known), then unload it there: it is warm on a only
            loaded = await client.post(url + "/lmgate/models/big/load?upstream=b")
            assert loaded.status_code == 200 and loaded.json()["upstream"] == "b", loaded.text
            assert (await client.post(url + "/lmgate/models/big/unload?upstream=b")).status_code == 200
        loads_before = b.counters.loads_started
        # a's one slot taken, and no request has finished there yet: the expected wait is the
        # limiter's default (5 s), far longer than the 0.1 s load measured on b.
        async with anyio.create_task_group() as tg, holding(client, url, a, "big"):
            answers: list[httpx.Response] = []

            async def request() -> None:
                answers.append(await client.post(url + CHAT, json=chat("big")))

            if measured:
                await request()  # spills: loads a second instance on b
                await request()  # b is warm now: no further load
            else:
                tg.start_soon(request)
                tg.start_soon(request)
                limiter = gateway.stack.upstreams["a"].concurrency
                assert limiter is not None
                await eventually(lambda: limiter.pressure().queued == 2)

    router = router_of(gateway)
    events = [r for r in caplog.records if getattr(r, "event", None) == "model_second_instance"]
    assert [r.status_code for r in answers] == [200, 200]
    if measured:
        assert [r.headers["x-lmgate-upstream"] for r in answers] == ["b", "b"]
        assert [r.headers["x-lmgate-model-state"] for r in answers] == ["cold", "warm"]
        assert b.counters.loads_started - loads_before == 1 and b.counters.instances == {"big": 1}
        assert router.stats.second_instances == 1 and router.stats.chosen["spill"] == 1
        assert [(r.model, r.upstream) for r in events] == [("big", "b")]  # type: ignore[attr-defined]
    else:
        # Without a measured load time a second instance is never worth it: both queue for a.
        assert [r.headers["x-lmgate-upstream"] for r in answers] == ["a", "a"]
        assert b.counters.loads_started == 0 and b.counters.requests == 0
        assert router.stats.second_instances == 0 and events == []
    assert c.counters.requests == 0


async def test_a_failover_that_loads_the_model_while_it_is_loaded_elsewhere_is_logged_as_a_second_instance(client, caplog):
    # a answers 503 (busy, not gone): failing over to b is allowed, but b must load the model while
    # a still holds it, which doubles its memory: that is a second instance, logged and counted.
    caplog.set_level(logging.WARNING, logger="lmgate.routing")
    async with (
        simulators([model("alpha", loaded=True)], [model("alpha", load_delay_s=0.1)]) as (a, b),
        lmgate({"a": a.url, "b": b.url}, retry={"max_retries": 1, "backoff_base_s": 0.01}) as (url, gateway),
    ):
        a.inject_fault("http_error", count=2, status=503, model="alpha")
        answer = await client.post(url + CHAT, json=chat("alpha"))
    assert answer.status_code == 200 and answer.headers["x-lmgate-upstream"] == "b"
    # a: one attempt, no retry in place (its retry layer leaves the failure to the router), then b.
    assert (a.counters.requests, b.counters.loads_started) == (1, 1)
    router = router_of(gateway)
    assert router.stats.failovers == 1 and router.stats.second_instances == 1
    events = [r for r in caplog.records if getattr(r, "event", None) == "model_second_instance"]
    assert [(r.model, r.upstream, r.cause) for r in events] == [("alpha", "b", "load")]  # type: ignore[attr-defined]


# --- 4. an upstream dies mid-run: nothing lost before the first byte; it rejoins ------------------


async def test_a_killed_upstream_loses_no_request_that_had_not_started_streaming_and_rejoins(client, caplog):
    caplog.set_level(logging.INFO, logger="lmgate.routing")
    a_models = [model("alpha", loaded=True), model("only-a", load_delay_s=0.1)]
    async with (
        simulators(a_models, [model("alpha", load_delay_s=0.2)], [model("gamma", loaded=True)]) as (a, b, c),
        anyio.create_task_group() as wires,
    ):
        wire = Wire(a.port)
        await wires.start(wire.run)
        async with lmgate(
            {"a": wire.url, "b": b.url, "c": c.url}, limits={"a": {"limit": 8}}, models={"refresh_s": 0.3}
        ) as (url, gateway):
            router = router_of(gateway)
            # Four requests on a that have not got a byte from it yet (the last a stream the
            # heartbeat layer has opened already), and one that is streaming from a.
            a.inject_fault("hang_before_headers", count=4, model="alpha")
            waiting = [BackgroundStream(client, url + CHAT, chat("alpha")) for _ in range(3)]
            waiting.append(BackgroundStream(client, url + CHAT, chat("alpha", stream=True)))
            async with anyio.create_task_group() as tg:
                for request in waiting:
                    tg.start_soon(request.run)
                await a.wait_for(lambda counters: counters.requests == 4)
                with anyio.fail_after(5):
                    await waiting[-1].started.wait()  # 200 and heartbeats, nothing from a
                a.inject_fault("hang_after_headers", model="alpha")
                streaming = BackgroundStream(client, url + CHAT, chat("alpha", stream=True))
                tg.start_soon(streaming.run)
                with anyio.fail_after(5):
                    await streaming.started.wait()
                await wire.cut()  # a dies
                during = await post_all(client, url, [chat("alpha"), chat("gamma"), chat("alpha")])

            # Those that had not started streaming from a failed over to b, which loaded alpha once.
            assert [r.status for r in waiting] == [200] * 4, [(r.raw, r.response_headers) for r in waiting]
            assert [r.response_headers["x-lmgate-upstream"] for r in waiting[:3]] == ["b"] * 3  # type: ignore[index]
            assert all(r.error is None and b'"content"' in r.raw for r in waiting[:3])
            heartbeats = waiting[-1]
            assert b": lmgate " in heartbeats.raw and b"x-lmgate-upstream=b" in heartbeats.raw
            assert heartbeats.raw.endswith(b"data: [DONE]\n\n") and b"event: error" not in heartbeats.raw
            # The one that had started on a is cut, not retried (its first byte was out).
            assert streaming.response_headers is not None and streaming.response_headers["x-lmgate-upstream"] == "a"
            assert b"data: [DONE]" not in streaming.raw
            # Meanwhile the others kept serving.
            assert [r.status_code for r in during] == [200] * 3
            assert [r.headers["x-lmgate-upstream"] for r in during] == ["b", "c", "b"]
            assert b.counters.loads_started == 1 and b.counters.generations_started == 6
            assert router.stats.failovers >= 1 and not router.reachable("a")
            assert router.stats.second_instances == 0  # a is gone: b's load is the only instance
            # A model only a has: a did not answer, so it may be there.
            gone = await client.post(url + CHAT, json=chat("only-a"))
            assert gone.status_code == 503, gone.text
            assert "a did not answer" in gone.json()["error"]["message"]

            async with Simulator(models=a_models) as again:  # restarted, behind the same address
                rewired = Wire(again.port, port=wire.port)
                await wires.start(rewired.run)
                # The next refresh of a's model state (due refresh_s after the last) finds it back.
                registry = router.by_name["a"].registry
                await eventually(lambda: not registry.fresh)
                back = await client.post(url + CHAT, json=chat("only-a"))
                assert back.status_code == 200, back.text
                assert back.headers["x-lmgate-upstream"] == "a" and router.reachable("a")
                assert again.counters.loads_started == 1
                await rewired.cut()
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "upstream_failover" in events and "upstream_up" in events


# --- 5. the merged model lists --------------------------------------------------------------------


async def test_the_model_lists_are_merged_each_model_once_at_its_best_state(client):
    async with simulators(
        [model("alpha", loaded=True), model("beta")],
        [model("alpha"), model("beta", loaded=True)],
        [model("alpha", loaded=True), model("gamma")],
    ) as (a, b, c):
        async with lmgate(named(a, b, c)) as (url, _):
            openai_list = await client.get(url + "/v1/models")
            v0 = await client.get(url + "/api/v0/models")
            v1 = await client.get(url + "/api/v1/models")
            one = await client.get(url + "/api/v0/models/beta")
        async with lmgate({**named(a, b, c), "d": dead_url()}) as (url, _):
            partial = await client.get(url + "/v1/models")

    assert openai_list.status_code == 200 and openai_list.headers["x-lmgate-upstream"] == "a, b, c"
    assert "x-lmgate-upstreams-unanswered" not in openai_list.headers
    assert sorted(m["id"] for m in openai_list.json()["data"]) == ["alpha", "beta", "gamma"]
    assert {m["id"]: m["state"] for m in v0.json()["data"]} == {"alpha": "loaded", "beta": "loaded", "gamma": "not-loaded"}
    instances = {m["key"]: [i["id"] for i in m["loaded_instances"]] for m in v1.json()["models"]}
    assert set(instances) == {"alpha", "beta", "gamma"} and instances["beta"] == ["beta"] and instances["gamma"] == []
    assert instances["alpha"] == ["alpha"]  # loaded on a and c under one instance id: one entry
    # One model's own route goes to where it is loaded.
    assert one.status_code == 200 and one.headers["x-lmgate-upstream"] == "b" and one.json()["state"] == "loaded"
    # With one upstream down the list is partial, and says which did not answer.
    assert partial.status_code == 200 and partial.headers["x-lmgate-upstreams-unanswered"] == "d"
    assert sorted(m["id"] for m in partial.json()["data"]) == ["alpha", "beta", "gamma"]


# --- 6. pins, and the models nobody has ----------------------------------------------------------


async def test_a_pinned_model_is_served_and_loaded_only_on_its_upstreams(client):
    async with (
        simulators(
            [model("shared", loaded=True), model("free", loaded=True)],
            [model("shared", load_delay_s=0.1)],
            [model("shared", load_delay_s=0.1), model("other", loaded=True)],
        ) as (a, b, c),
        lmgate(named(a, b, c), models={"pin": {"shared": ["c"]}}) as (url, _),
    ):
        answers = await post_all(client, url, [chat("shared")] * 3)
        free = await client.post(url + CHAT, json=chat("free"))
        loaded = await client.post(url + "/lmgate/models/shared/load")  # the admin's load follows the pin too
        refused = await client.post(url + "/lmgate/models/shared/load?upstream=b")  # and may not break it

    assert [r.status_code for r in answers] == [200] * 3
    assert {r.headers["x-lmgate-upstream"] for r in answers} == {"c"}  # warm on a, but pinned to c
    assert (a.counters.generations_started, b.counters.requests, c.counters.loads_started) == (1, 0, 1)
    assert free.headers["x-lmgate-upstream"] == "a"  # unpinned models go anywhere
    assert loaded.json() == {"model": "shared", "upstream": "c", "status": "already_loaded", "load_s": None}
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_pinned"
    assert b.counters.loads_started == 0


async def test_a_model_no_upstream_lists_is_404_naming_the_upstreams_asked(client):
    async with (
        simulators([model("alpha", loaded=True)], [model("beta", loaded=True)], [model("gamma")]) as (a, b, c),
        lmgate(named(a, b, c)) as (url, _),
    ):
        answer = await client.post(url + CHAT, json=chat("nowhere"))
        streamed = await client.post(url + CHAT, json=chat("nowhere", stream=True))
    assert answer.status_code == 404 == streamed.status_code
    error = answer.json()["error"]
    assert (error["code"], error["type"], error["param"]) == ("model_not_found", "invalid_request_error", "model")
    assert "nowhere" in error["message"] and "asked: a, b, c" in error["message"]
    assert sum(s.counters.requests for s in (a, b, c)) == 0  # refused without bothering any of them


async def test_a_model_unknown_to_those_that_answered_is_503_while_one_did_not_answer(client):
    async with (
        simulators([model("alpha", loaded=True)], [model("beta", loaded=True)]) as (a, b),
        lmgate({"a": a.url, "b": b.url, "d": dead_url()}, models={"pin": {"beta": ["d"]}}) as (url, _),
    ):
        unknown = await client.post(url + CHAT, json=chat("nowhere"))
        pinned_to_the_dead = await client.post(url + CHAT, json=chat("beta"))
        alive = await client.post(url + CHAT, json=chat("alpha"))
    for answer in (unknown, pinned_to_the_dead):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "upstream_unavailable" and "d did not answer" in answer.json()["error"]["message"]
        assert "retry-after" in answer.headers
    assert alive.status_code == 200 and alive.headers["x-lmgate-upstream"] == "a"
    assert b.counters.requests == 0


# --- 7. one upstream: no router ------------------------------------------------------------------


@pytest.mark.parametrize("section", ["upstream", "upstreams"])
async def test_with_one_upstream_there_is_no_router(client, section):
    async with Simulator(models=[model("alpha", loaded=True)]) as sim:
        document: dict[str, Any] = (
            {"upstream": {"url": sim.url}} if section == "upstream" else {"upstreams": [{"name": "solo", "url": sim.url}]}
        )
        async with serve_gateway(Config.model_validate(document)) as (url, gateway):
            answer = await client.post(url + CHAT, json=chat("alpha"))
            listed = await client.get(url + "/v1/models")
            assert gateway.stack.router is None and gateway.stack.upstreams == {}
            assert "circuit_breaker" in gateway.stack.layers and "proxy" not in gateway.stack.layers
    assert answer.status_code == 200 and listed.status_code == 200
    assert "x-lmgate-upstream" not in answer.headers and "x-lmgate-upstream" not in listed.headers


# --- 8. the official client --------------------------------------------------------------------


async def test_the_openai_client_streams_through_several_upstreams():
    async with (
        simulators([model("alpha", loaded=True)], [model("beta", loaded=True)], [model("beta", load_delay_s=0.1)]) as (a, b, c),
        lmgate(named(a, b, c)) as (url, _),
        openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as sdk,
        openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0) as direct_sdk,
    ):
        stream = await sdk.chat.completions.with_raw_response.create(
            model="beta", messages=MESSAGES, stream=True, max_tokens=8  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream.parse()]  # type: ignore[union-attr]
        direct = [chunk async for chunk in await direct_sdk.chat.completions.create(
            model="beta", messages=MESSAGES, stream=True, max_tokens=8  # type: ignore[arg-type]
        )]
    assert stream.headers["x-lmgate-upstream"] == "b"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == "".join(c.choices[0].delta.content or "" for c in direct if c.choices)
    assert (a.counters.requests, b.counters.generations_started, c.counters.requests) == (0, 2, 0)



# --- the LLM health check: each model where a request for it would go ----------------------------


async def test_the_llm_health_check_probes_each_model_on_the_upstream_that_serves_it(client):
    async with (
        simulators([model("alpha", loaded=True)], [model("beta", loaded=True)], [model("alpha"), model("beta")]) as (
            a,
            b,
            c,
        ),
        lmgate(named(a, b, c), health={"models": ["alpha", "beta", "nowhere"]}) as (url, _),
    ):
        answer = await client.get(url + "/lmgate/health/llm")
    document = answer.json()
    checks = document["models"]
    assert (checks["alpha"]["status"], checks["alpha"]["upstream"]) == ("ok", "a")
    assert (checks["beta"]["status"], checks["beta"]["upstream"]) == ("ok", "b")
    # A model no upstream lists is the finding itself, named with the upstreams asked.
    assert checks["nowhere"]["status"] == "failed" and "asked: a, b, c" in checks["nowhere"]["reason"]
    assert answer.status_code == 503 and document["status"] == "unhealthy"
    # Nothing was loaded to answer the check: each probe went where its model is warm.
    assert [s.counters.loads_started for s in (a, b, c)] == [0, 0, 0]
    assert c.counters.requests == 0
