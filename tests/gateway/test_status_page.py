"""The status page: ``status.json`` against the simulator, and the page itself in headless Chromium.

The JSON tests always run. The browser test needs Debian's ``chromium`` (CI installs it; set
``LMGATE_REQUIRE_CHROMIUM=1`` to make a missing browser fail instead of skip). It drives Chromium
through the DevTools protocol over a websocket (``wsproto``, which hypercorn already needs), waits
for the page's own ``lmgate:render`` events instead of sleeping, and keeps a screenshot in
``test-artifacts/status-page.png``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from anyio.abc import ByteStream, Process
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage
from wsproto.events import Message as WSMessage

from gateway.app import Gateway, serve_gateway
from gateway.config.settings import Config
from gateway.simulator import SimModel, Simulator
from middleware.auth import hash_key

pytestmark = pytest.mark.anyio

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHAT = "/v1/chat/completions"


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say ok"}], **extra}


@asynccontextmanager
async def gateway_on(sim: Simulator, **sections: Any) -> AsyncIterator[str]:
    async with gateway_app(sim, **sections) as (url, _):
        yield url


@asynccontextmanager
async def gateway_app(sim: Simulator, **sections: Any) -> AsyncIterator[tuple[str, Gateway]]:
    async with serve_gateway(Config.model_validate({"upstream": {"url": sim.url}, **sections})) as served:
        yield served


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
        yield c


# --- status.json ---------------------------------------------------------------------------------


async def test_status_json_gathers_models_traffic_latency_and_errors(client: httpx.AsyncClient) -> None:
    models = [SimModel(id="warm-1b", loaded=True, tokens_per_second=500.0), SimModel(id="cold-8b", load_delay_s=0.2)]
    async with Simulator(models=models) as sim, gateway_on(sim, cache={"enabled": True}) as url:
        assert (await client.post(url + CHAT, json=chat("warm-1b", stream=True))).status_code == 200
        assert (await client.post(url + CHAT, json=chat("no-such-model"))).status_code == 400
        await client.post(url + CHAT, json=chat("warm-1b", temperature=0))
        await client.post(url + CHAT, json=chat("warm-1b", temperature=0))
        response = await client.get(url + "/lmgate/status.json")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    status = response.json()
    states = {m["id"]: m["state"] for m in status["models"]}
    assert states == {"warm-1b": "loaded", "cold-8b": "not-loaded"}
    assert status["upstream"]["api"] == "api/v1" and status["ready"] is True and status["draining"] is False
    assert status["concurrency"] == {"*": {"limit": 4, "in_flight": 0, "queued": 0}}
    assert status["breakers"] == {"upstream": "closed"}
    [card] = status["upstreams"]  # one upstream: one card, under the name it has by default
    assert card == {
        "name": "default", "url": sim.url, "reachable": True, "refresh_error": None, "circuit": "closed",
        "slots": {"limit": 4, "in_flight": 0, "queued": 0}, "loaded": ["warm-1b"], "loading": [],
    }
    assert status["latency"]["warm-1b"]["count"] == 3 and status["latency"]["warm-1b"]["ttft_ms"] is not None
    assert [point["model"] for point in status["series"]] == ["warm-1b"] * 3
    assert status["errors"]["by_category"] == {"model_not_found": 1}
    assert status["errors"]["recent"][0]["model"] == "no-such-model"
    assert status["cache"]["entries"] == 1 and status["cache"]["lookups"] == {"hit": 1, "miss": 1, "bypass": 0}
    assert "shared" not in status["cache"] and status["shared_state"] is None  # no Redis: nothing shared


async def test_status_json_with_redis_reports_the_shared_state_and_the_shared_cache(client: httpx.AsyncClient, redis_server) -> None:
    models = [SimModel(id="warm-1b", loaded=True, tokens_per_second=500.0)]
    sections = {"cache": {"enabled": True}, "state": {"redis_url": redis_server.url, "lease_s": 0.3}}
    async with Simulator(models=models) as sim, gateway_app(sim, **sections) as (url, app):
        await client.post(url + CHAT, json=chat("warm-1b", temperature=0))
        state = app.collaborators.state
        assert state is not None

        async def status_when(condition: Any) -> dict[str, Any]:
            with anyio.fail_after(5):  # counted on the shared state's heartbeat (lease_s / 3)
                while not condition(status := (await client.get(url + "/lmgate/status.json")).json()):
                    await anyio.sleep(0.05)
            return status

        # The answer is written once its last byte is out, and counted at the next heartbeat.
        status = await status_when(lambda s: (s["cache"]["shared"] or {}).get("entries") == 1)
        assert status["shared_state"] == {"available": True, "for_s": status["shared_state"]["for_s"], "last_error": None}
        assert status["cache"]["shared"]["bytes"] > 0
        assert status["cache"]["entries"] == 0  # the local fallback store: nothing kept there
        redis_server.stop()
        status = await status_when(lambda s: not s["shared_state"]["available"])
        assert status["shared_state"]["last_error"] and status["cache"]["shared"] is None


async def test_status_json_has_one_card_per_upstream(client: httpx.AsyncClient) -> None:
    """Two simulators: a card each, with the slot a stream holds, the circuit, the models loaded
    there and the one loading; an upstream that stops answering is reported unreachable."""
    sims = (
        Simulator(models=[SimModel(id="alpha", loaded=True, tokens_per_second=20.0)]),
        Simulator(models=[SimModel(id="beta", loaded=True), SimModel(id="gamma", load_delay_s=1.0)]),
    )
    async with sims[0] as a, sims[1] as b:
        config = Config.model_validate({
            "upstreams": [{"name": "a", "url": a.url, "concurrency": {"limit": 2}}, {"name": "b", "url": b.url}],
            "models": {"refresh_s": 0.2},
        })
        async with serve_gateway(config) as (url, app), anyio.create_task_group() as tg:
            body = chat("alpha", stream=True, max_tokens=40)
            async with client.stream("POST", url + CHAT, json=body) as streaming:
                assert streaming.headers["x-lmgate-upstream"] == "a"
                tg.start_soon(partial(client.post, url + "/lmgate/models/gamma/load"))
                loading = app.collaborators.upstreams[1].models.registry
                await loading.wait_for(lambda registry: registry.state("gamma") == "loading")
                status = (await client.get(url + "/lmgate/status.json")).json()
            tg.cancel_scope.cancel()  # the stream was left unread: the client is gone
        by_name = {card["name"]: card for card in status["upstreams"]}
        assert list(by_name) == ["a", "b"]
        assert by_name["a"] == {
            "name": "a", "url": a.url, "reachable": True, "refresh_error": None, "circuit": "closed",
            "slots": {"limit": 2, "in_flight": 1, "queued": 0}, "loaded": ["alpha"], "loading": [],
        }
        assert (by_name["b"]["loaded"], by_name["b"]["loading"], by_name["b"]["slots"]["in_flight"]) == (
            ["beta"], ["gamma"], 0
        )
        assert status["concurrency"]["a/*"] == {"limit": 2, "in_flight": 1, "queued": 0}
        assert status["breakers"] == {"a": "closed", "b": "closed"}
        assert {(m["id"], m["upstream"]) for m in status["models"]} == {("alpha", "a"), ("beta", "b"), ("gamma", "b")}


async def test_an_upstream_that_does_not_answer_is_shown_unreachable(client: httpx.AsyncClient) -> None:
    async with Simulator(models=[SimModel(id="beta")]) as gone:
        pass  # its port is closed from here on
    async with Simulator(models=[SimModel(id="alpha", loaded=True)]) as a:
        config = Config.model_validate({"upstreams": [{"name": "a", "url": a.url}, {"name": "b", "url": gone.url}]})
        async with serve_gateway(config) as (url, app):
            status = (await client.get(url + "/lmgate/status.json")).json()
            served = await client.post(url + CHAT, json=chat("alpha"))
    card_a, card_b = status["upstreams"]
    assert (card_a["name"], card_a["reachable"], card_a["refresh_error"]) == ("a", True, None)
    assert (card_b["name"], card_b["reachable"], card_b["loaded"]) == ("b", False, [])
    assert card_b["refresh_error"]
    assert served.status_code == 200 and served.headers["x-lmgate-upstream"] == "a"


async def test_loading_model_reports_elapsed_and_expected_time(client: httpx.AsyncClient) -> None:
    models = [SimModel(id="cold-a", load_delay_s=0.2), SimModel(id="cold-b", load_delay_s=1.0)]
    async with Simulator(models=models) as sim, gateway_app(sim) as (url, app):
        await client.post(url + "/lmgate/models/cold-a/load")  # one load seen: the ETA for cold-b scales from it
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(client.post, url + "/lmgate/models/cold-b/load"))
            await app.models.registry.wait_for(lambda registry: registry.state("cold-b") == "loading")
            status = (await client.get(url + "/lmgate/status.json")).json()
    loading = next(m["loading"] for m in status["models"] if m["id"] == "cold-b")
    assert loading["elapsed_s"] >= 0 and loading["expected_s"] == pytest.approx(0.2, abs=0.15)


async def test_page_is_self_contained_and_both_routes_need_a_key_once_keys_exist(client: httpx.AsyncClient) -> None:
    async with Simulator(models=[SimModel(id="m", loaded=True)]) as sim, gateway_on(sim, auth={"keys": [hash_key("k1")]}) as url:
        for path in ("/lmgate/", "/lmgate", "/lmgate/status.json"):
            assert (await client.get(url + path)).status_code == 401
        page = await client.get(url + "/lmgate/", headers={"authorization": "Bearer k1"})
        posted = await client.post(url + "/lmgate/status.json", headers={"authorization": "Bearer k1"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert "status.json" in html and "innerHTML" not in html
    for external in ("src=\"http", "href=\"http", "src='http", "@import", "url(http"):
        assert external not in html
    assert posted.status_code == 403  # a POST to an admin route needs the admin key first


# --- the page in headless Chromium ----------------------------------------------------------------


@pytest.fixture
def chromium_binary() -> str:
    """The browser's path. A fixture, so that a missing browser skips at set-up with this reason:
    a skip raised inside the test's servers would surface as their task group's error instead."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("LMGATE_REQUIRE_CHROMIUM") == "1":
        pytest.fail("LMGATE_REQUIRE_CHROMIUM=1 but Chromium is not on PATH: apt-get install -y chromium")
    pytest.skip("Chromium not found on PATH (chromium, chromium-browser): apt-get install -y chromium, "
                "or set LMGATE_REQUIRE_CHROMIUM=1 to fail instead")


class DevTools:
    """A minimal Chrome DevTools protocol client for one page target, over a wsproto websocket."""

    def __init__(self, stream: ByteStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.next_id = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.arrived = anyio.Event()

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[DevTools]:
        parts = urlsplit(url)
        stream = await anyio.connect_tcp(parts.hostname or "127.0.0.1", parts.port or 80)
        async with stream:
            ws = WSConnection(ConnectionType.CLIENT)
            await stream.send(ws.send(Request(host=parts.netloc, target=parts.path)))
            devtools = cls(stream, ws)
            with anyio.fail_after(10):
                while not any(isinstance(event, AcceptConnection) for event in await devtools._read()):
                    pass
            async with anyio.create_task_group() as tg:
                tg.start_soon(devtools._pump)
                yield devtools
                tg.cancel_scope.cancel()

    async def _read(self) -> list[Any]:
        self.ws.receive_data(await self.stream.receive())
        return list(self.ws.events())

    async def _pump(self) -> None:
        text: list[str] = []
        while True:
            for event in await self._read():
                if isinstance(event, Ping):
                    await self.stream.send(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    return
                elif isinstance(event, TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        self._dispatch(json.loads("".join(text)))
                        text = []

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            self.replies[message["id"]] = message
        else:
            self.events.append(message)
        self.arrived.set()
        self.arrived = anyio.Event()

    async def call(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        number = self.next_id
        await self.stream.send(self.ws.send(WSMessage(data=json.dumps({"id": number, "method": method, "params": params}))))
        with anyio.fail_after(timeout):
            while number not in self.replies:
                await self.arrived.wait()
        reply = self.replies.pop(number)
        assert "error" not in reply, reply
        return reply["result"]

    async def wait_until(self, condition: str, timeout: float = 10.0) -> Any:
        """Evaluate JS ``condition`` after each render of the page until it returns a truthy value."""
        script = f"""new Promise((resolve) => {{
            const check = () => {{ const value = ({condition}); if (value) {{ resolve(value); return true; }} return false; }};
            if (!check()) {{
                const again = () => {{ if (check()) document.removeEventListener("lmgate:render", again); }};
                document.addEventListener("lmgate:render", again);
            }}
        }})"""
        result = await self.call("Runtime.evaluate", timeout=timeout, expression=script, awaitPromise=True, returnByValue=True)
        return result["result"].get("value")

    def console_errors(self) -> list[dict[str, Any]]:
        errors = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            thrown = method == "Runtime.exceptionThrown"
            logged = method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert")
            reported = method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error"
            if thrown or logged or reported:
                errors.append(params)
        return errors


@asynccontextmanager
async def chromium(binary: str, profile: Path) -> AsyncIterator[str]:
    """Headless Chromium on about:blank; yields the page's DevTools websocket URL."""
    args = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1", "--window-size=1280,900", "about:blank",
    ]
    process: Process = await anyio.open_process(args, stdin=None, stdout=None)
    listening = anyio.Event()
    endpoint: list[str] = []

    async def drain_stderr() -> None:
        """Read stderr to its end (a full pipe would stall the browser); note the DevTools line."""
        assert process.stderr is not None
        buffered = b""
        async for chunk in process.stderr:
            if not listening.is_set():
                buffered += chunk
                marker = buffered.find(b"DevTools listening on ")
                if marker >= 0 and b"\n" in buffered[marker:]:
                    endpoint.append(buffered[marker:].split(b"\n", 1)[0].split(b" ")[-1].decode())
                    listening.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_stderr)
            with anyio.fail_after(30):
                await listening.wait()
            port = urlsplit(endpoint[0]).port
            async with httpx.AsyncClient(trust_env=False) as http:
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            tg.cancel_scope.cancel()
    finally:
        process.terminate()
        with anyio.move_on_after(10, shield=True) as waited:
            await process.aclose()  # waits for the exit, closes the pipes
        if waited.cancelled_caught:
            process.kill()


@pytest.mark.slow
async def test_page_shows_a_model_going_from_loading_to_loaded_without_console_errors(
    tmp_path: Path, chromium_binary: str
) -> None:
    models = [
        SimModel(id="qwen2.5-0.5b-instruct", loaded=True, tokens_per_second=400.0),
        # Loads take time in proportion to size: the warm-up's load gives the instruct model its ETA.
        SimModel(id="llama-3.1-8b-warmup", load_delay_s=0.5, size_bytes=1_000_000_000),
        SimModel(id="llama-3.1-8b-instruct", load_delay_s=2.5, size_bytes=5_000_000_000, tokens_per_second=400.0),
    ]
    browser = chromium(chromium_binary, tmp_path / "profile")
    async with (
        Simulator(models=models) as sim,
        gateway_on(sim) as url,
        browser as page_ws,
        httpx.AsyncClient(timeout=30.0, trust_env=False) as client,
        DevTools.connect(page_ws) as devtools,
    ):
        await client.post(url + "/lmgate/models/llama-3.1-8b-warmup/load")  # a load seen: ETAs from now on
        await client.post(url + CHAT, json=chat("qwen2.5-0.5b-instruct", stream=True))
        await client.post(url + CHAT, json=chat("no-such-model"))  # one error for the errors panel
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            await devtools.call(domain)
        await devtools.call("Page.navigate", url=url + "/lmgate/?interval=150")
        row = 'document.querySelector(\'[data-model="llama-3.1-8b-instruct"]\')'
        assert await devtools.wait_until(f"{row} && {row}.dataset.state") == "not-loaded"
        # One upstream: one card, as the page always had one upstream.
        card = 'document.querySelector("#upstreams [data-upstream=default]")'
        assert await devtools.wait_until(f"{card}?.dataset.reachable") == "true"
        assert await devtools.wait_until('document.querySelectorAll("#upstreams [data-upstream]").length') == 1
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(client.post, url + CHAT, json=chat("llama-3.1-8b-instruct", stream=True)))
            text = await devtools.wait_until(f'{row} && {row}.dataset.state === "loading" && {row}.textContent')
            assert "loading… " in text and "/ ~2.5 s" in text
            shot = await devtools.call("Page.captureScreenshot", format="png")
            assert await devtools.wait_until(f'{row} && {row}.dataset.state === "loaded"', timeout=15)
        errors_panel = await devtools.wait_until('document.querySelector("[data-category=model_not_found]")?.textContent')
        assert errors_panel == "model_not_found 1"
        assert await devtools.wait_until('document.querySelector("#chart polyline")?.getAttribute("points")')
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "status-page-loading.png").write_bytes(base64.b64decode(shot["data"]))
        final = await devtools.call("Page.captureScreenshot", format="png")
        (ARTIFACTS / "status-page.png").write_bytes(base64.b64decode(final["data"]))
        assert devtools.console_errors() == []


@pytest.mark.slow
async def test_page_shows_the_shared_state_and_the_shared_cache(tmp_path: Path, chromium_binary: str, redis_server) -> None:
    models = [SimModel(id="warm-1b", loaded=True, tokens_per_second=500.0)]
    sections = {"cache": {"enabled": True}, "state": {"redis_url": redis_server.url, "lease_s": 0.3}}
    async with (
        Simulator(models=models) as sim,
        gateway_on(sim, **sections) as url,
        chromium(chromium_binary, tmp_path / "profile") as page_ws,
        httpx.AsyncClient(timeout=30.0, trust_env=False) as client,
        DevTools.connect(page_ws) as devtools,
    ):
        await client.post(url + CHAT, json=chat("warm-1b", temperature=0))
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            await devtools.call(domain)
        await devtools.call("Page.navigate", url=url + "/lmgate/?interval=150")
        pill = 'document.querySelector("#shared [data-available]")'
        assert await devtools.wait_until(f"{pill}?.dataset.available") == "true"
        assert (await devtools.wait_until(f"{pill}.textContent")).startswith("shared on Redis")
        cache = 'document.querySelector("#cache .shared-cache")?.textContent'
        shared = await devtools.wait_until(f"{cache}?.startsWith('1 answers') && {cache}")
        assert "shared by every replica" in shared
        local = await devtools.wait_until('document.querySelector("#cache .local-cache")?.textContent')
        assert local.startswith("this replica: hits 0, misses 1") and "kept locally while Redis was unavailable: 0 answers" in local
        redis_server.stop()
        assert await devtools.wait_until(f'{pill}?.dataset.available === "false" && {pill}.textContent')
        assert "deciding alone" in await devtools.wait_until(f"{pill}.textContent")
        assert await devtools.wait_until(f"{cache}") == "shared answers: not counted now (Redis unavailable)"
        assert await devtools.wait_until('document.querySelector("#shared .shared-error")?.textContent')
        shot = await devtools.call("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "status-page-shared-state.png").write_bytes(base64.b64decode(shot["data"]))
        assert devtools.console_errors() == []


@pytest.mark.slow
async def test_page_shows_one_card_per_upstream_with_its_slots_and_models(tmp_path: Path, chromium_binary: str) -> None:
    async with Simulator(models=[SimModel(id="beta")]) as gone:
        pass  # a third upstream that never answers
    sims = (
        Simulator(models=[SimModel(id="alpha", loaded=True, tokens_per_second=20.0)]),
        Simulator(models=[SimModel(id="beta", loaded=True)]),
    )
    async with (
        sims[0] as a,
        sims[1] as b,
        serve_gateway(Config.model_validate({"upstreams": [
            {"name": "studio-a", "url": a.url}, {"name": "studio-b", "url": b.url}, {"name": "studio-c", "url": gone.url},
        ]})) as (url, _),
        chromium(chromium_binary, tmp_path / "profile") as page_ws,
        httpx.AsyncClient(timeout=30.0, trust_env=False) as client,
        DevTools.connect(page_ws) as devtools,
    ):
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            await devtools.call(domain)
        await devtools.call("Page.navigate", url=url + "/lmgate/?interval=150")
        cards = 'Array.from(document.querySelectorAll("#upstreams [data-upstream]"))'
        shown = await devtools.wait_until(f"{cards}.length === 3 && {cards}.map((c) => [c.dataset.upstream, "
                                          "c.dataset.reachable, c.querySelector('.loaded').textContent])")
        assert shown == [["studio-a", "true", "alpha"], ["studio-b", "true", "beta"], ["studio-c", "false", "–"]]
        card_a = 'document.querySelector("#upstreams [data-upstream=studio-a]")'
        assert await devtools.wait_until(f"{card_a}.querySelector('.slots').textContent") == "0 / 4 in use"
        header = await devtools.wait_until('document.getElementById("upstream").textContent')
        assert header == "3 upstreams"
        rows = 'Array.from(document.querySelectorAll("#models [data-model]")).map((r) => r.cells[0].textContent)'
        assert await devtools.wait_until(f"{rows}.length === 2 && {rows}") == ["alpha · studio-a", "beta · studio-b"]
        async with anyio.create_task_group() as tg:
            body = chat("alpha", stream=True, max_tokens=40)  # two seconds at 20 tokens/s
            tg.start_soon(partial(client.post, url + CHAT, json=body))
            busy = await devtools.wait_until(f"{card_a}.querySelector('.slots').textContent.startsWith('1 /') && "
                                             f"{card_a}.textContent")
            assert "1 / 4 in use" in busy and "circuit closed" in busy
            shot = await devtools.call("Page.captureScreenshot", format="png")
            assert await devtools.wait_until(f"{card_a}.querySelector('.slots').textContent === '0 / 4 in use'", timeout=15)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "status-page-upstreams.png").write_bytes(base64.b64decode(shot["data"]))
        assert devtools.console_errors() == []
