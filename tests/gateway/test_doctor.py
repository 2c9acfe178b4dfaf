"""``lmgate doctor`` against the simulator, lmgate in front of it, and a plain OpenAI-style server.

The command itself runs in a worker thread (it starts its own event loop, as from a shell) and is
pointed at lmgate in front of the simulator, both serving from the test's loop. The async core
``diagnose`` is called in the test's loop where a test talks to the simulator directly or needs
the report object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
import yaml

from gateway.app import serve_gateway
from gateway.cli import _parser, main
from gateway.cli.doctor import DoctorOptions, diagnose
from gateway.cli.doctor.advice import judge_heartbeat
from gateway.cli.doctor.report import Attempt, percentiles_ms
from gateway.cli.doctor.target import LM_STUDIO_DEFAULT, LMGATE_DEFAULT, default_target
from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, SimSettings, Simulator
from middleware.types import Receive, Scope, Send

pytestmark = pytest.mark.anyio

FAST = "qwen2.5-0.5b-instruct"
COLD = "llama-3.1-8b-instruct"
EMBED = "text-embedding-nomic-embed-text-v1.5"


def models(**fast: Any) -> list[SimModel]:
    return [
        SimModel(id=FAST, loaded=True, tokens_per_second=2000.0, ttft_base_s=0.005, context_length=8192, **fast),
        SimModel(id=COLD, load_delay_s=0.6, tokens_per_second=2000.0, ttft_base_s=0.005),
        SimModel(id=EMBED, type="embeddings"),
    ]


async def doctor(*args: str) -> tuple[int, str]:
    """``lmgate doctor ARGS`` in a worker thread: (exit code, stdout)."""
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return main(["doctor", *args])

    return await anyio.to_thread.run_sync(run), out.getvalue()


@asynccontextmanager
async def lmgate_in_front(sim: Simulator, **sections: Any) -> AsyncIterator[str]:
    async with serve_gateway(Config.model_validate({"upstream": {"url": sim.url}, **sections})) as (url, _):
        yield url


# --- the command -----------------------------------------------------------------------------------


async def test_healthy_simulator_exits_0_with_the_table() -> None:
    async with Simulator(models=models()) as sim, lmgate_in_front(sim) as url:
        code, out = await doctor("--url", url, "-n", "10", "--concurrency", "2")
    assert code == 0, out
    assert "Server       lmgate" in out and "/api/v1 yes · /api/v0 yes · OpenAI /v1 yes" in out
    assert f"{FAST}" in out and "8192 / 32768" in out and "not-loaded" in out
    assert "10 x qwen2.5-0.5b-instruct, 2 at a time" in out and "succeeded    10 / 10" in out
    assert "disconnects  0" in out and "first token ms" in out and "tokens/s       median" in out
    assert "ok       No escalation threshold crossed" in out


async def test_failures_over_5_percent_exit_1_with_advice_as_json() -> None:
    # One slot and no queue: concurrent requests are refused ("Server busy"), as an overloaded LM Studio
    # does; lmgate passes three at a time and does not retry.
    sections = {"concurrency": {"limit": 3}, "retry": {"enabled": False}, "circuit_breaker": {"enabled": False}}
    async with Simulator(models=models(parallel=1), settings=SimSettings(max_queued=0)) as sim, \
            lmgate_in_front(sim, **sections) as url:
        code, out = await doctor("--url", url, "-n", "10", "--concurrency", "3", "--json")
    report = json.loads(out)
    assert code == 1 and report["escalate"] is True
    generations = report["generations"]
    assert generations["failed"] >= 1 and generations["failed"] / generations["requests"] > 0.05
    assert set(generations["failed_by_category"]) == {"upstream_5xx"}
    assert generations["succeeded"] + generations["failed"] == 10
    escalations = [a["text"] for a in report["advice"] if a["level"] == "escalate"]
    assert any("over the 5% threshold" in text and "server logs" in text for text in escalations)
    assert report["advice"][-1]["level"] == "info" and "Collect" in report["advice"][-1]["text"]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["-n", "0"], "at least 1"), (["--url", "127.0.0.1:1234"], "http://"), (["--heartbeat-s", "-1"], "above 0")],
)
def test_usage_errors_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", *args]) == 2
    assert message in capsys.readouterr().err


# --- which server it checks ------------------------------------------------------------------------


async def test_with_config_it_checks_lmgate_at_its_listen_address_and_says_why(tmp_path: Path) -> None:
    async with Simulator(models=models()) as sim, lmgate_in_front(sim) as url:
        config = tmp_path / "lmgate.yaml"
        config.write_text(yaml.safe_dump({"listen": {"port": urlsplit(url).port}, "upstream": {"url": sim.url}}))
        out, err = io.StringIO(), io.StringIO()

        def run() -> int:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return main(["doctor", "--config", str(config), "-n", "2"])

        code = await anyio.to_thread.run_sync(run)
    assert err.getvalue().splitlines()[0] == f"checking lmgate at {url} (its listen address in {config})"
    assert code == 0 and "Server       lmgate" in out.getvalue()


async def test_without_url_or_config_it_checks_an_lmgate_answering_on_its_default_address() -> None:
    async with Simulator(models=models()) as sim, lmgate_in_front(sim) as url:
        target = await default_target(lmgate_url=url, lm_studio_url=sim.url)
    assert target.describe() == f"checking lmgate at {url} (it answered on lmgate's default port)"


async def test_without_url_or_config_it_falls_back_to_lm_studio_when_no_lmgate_answers() -> None:
    async with Simulator(models=models()) as sim:
        # Nothing listens on the discard port; the simulator (like LM Studio) is not taken for lmgate.
        for lmgate_url in ("http://127.0.0.1:9", sim.url):
            target = await default_target(lmgate_url=lmgate_url, lm_studio_url="http://127.0.0.1:1234")
            port = urlsplit(lmgate_url).port
            assert target.describe() == (
                f"checking LM Studio at http://127.0.0.1:1234 (no lmgate answered on {port}; pass --url to choose)"
            )


def test_the_defaults_are_lmgate_and_lm_studio_defaults() -> None:
    assert (LMGATE_DEFAULT, LM_STUDIO_DEFAULT) == ("http://127.0.0.1:8080", "http://127.0.0.1:1234")


def test_help_speaks_of_what_the_doctor_does() -> None:
    parser = _parser()
    assert "seed" not in parser.format_help()
    doctor_help = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["doctor"]
    assert "seed" not in doctor_help.format_help()


# --- the report ------------------------------------------------------------------------------------


async def test_nothing_listening_is_an_escalation() -> None:
    report = await diagnose(DoctorOptions(url="http://127.0.0.1:9", requests=1))
    assert report.escalate and not report.server.reachable
    assert "Nothing answers" in report.advice[0].text and report.generations is None


async def test_context_overflow_on_a_tiny_prompt_escalates() -> None:
    async with Simulator(models=models()) as sim:
        sim.inject_fault("context_overflow")  # the first request: the tiny prompt's first attempt
        report = await diagnose(DoctorOptions(url=sim.url, requests=4), env={"EVAL_CONCURRENCY": "2", "HOME": "/x"})
    tiny = report.tiny_prompt
    assert tiny is not None and [a.category for a in tiny.attempts] == ["context_overflow", None]
    assert report.escalate and report.generations is not None and report.generations.failure_ratio == 0
    texts = {a.level: a.text for a in report.advice}
    assert "context overflow" in texts["escalate"] and "still loading" in texts["warn"]
    assert report.environment == {"EVAL_CONCURRENCY": "2"}  # the troubleshooting guide's variables only


async def test_a_tiny_prompt_failing_twice_escalates() -> None:
    async with Simulator(models=models()) as sim:
        sim.inject_fault("http_error", count=2, status=500, message="Model has crashed")
        report = await diagnose(DoctorOptions(url=sim.url, requests=2))
    assert report.tiny_prompt is not None and report.tiny_prompt.consistent_failure
    assert [a.category for a in report.tiny_prompt.attempts] == ["upstream_5xx", "upstream_5xx"]
    assert any(a.level == "escalate" and "tiny prompt" in a.text for a in report.advice)


async def test_cold_load_through_lmgate_is_covered_by_heartbeats() -> None:
    async with Simulator(models=models()) as sim, lmgate_in_front(sim, models={"heartbeat_s": 0.2}) as url:
        report = await diagnose(DoctorOptions(url=url, requests=2, cold=COLD, heartbeat_s=0.2))
    assert report.server.kind == "lmgate" and not report.escalate
    cold = report.cold
    assert cold is not None and cold.ok and cold.first_token_s is not None and cold.first_token_s >= 0.5
    assert cold.load_s is not None and cold.load_s >= 0.5  # lmgate's X-Lmgate-Load-Ms, carried in a comment
    heartbeat = report.heartbeat
    assert heartbeat is not None and heartbeat.verdict == "ok" and heartbeat.heartbeats_seen >= 2
    assert heartbeat.source == f"the cold load of {COLD}"


async def test_cold_load_straight_to_lm_studio_fails_the_heartbeat_check_without_escalating() -> None:
    async with Simulator(models=models()) as sim:
        await sim.load_model(COLD)
        report = await diagnose(DoctorOptions(url=sim.url, requests=2, cold=COLD, heartbeat_s=0.2))
    assert report.cold is not None and report.cold.unloaded == [COLD] and report.cold.ok
    assert report.heartbeat is not None and report.heartbeat.verdict == "fail"
    assert report.heartbeat.longest_silence_s >= 0.5 and report.heartbeat.heartbeats_seen == 0
    warning = next(a.text for a in report.advice if a.text.startswith("Heartbeat"))
    assert "put lmgate in front" in warning and not report.escalate


async def test_plain_openai_server_is_recognised_by_its_listing_shapes() -> None:
    async def openai_only(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/v1/models":
            document: Any = {"object": "list", "data": [{"id": "gpt-local", "object": "model"}]}
        else:  # what LM Studio answers on a route it lacks: 200 and an error
            document = {"error": f"Unexpected endpoint or method. (GET {path})"}
        body = json.dumps(document).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async with serve_in_background(openai_only) as server:
        report = await diagnose(DoctorOptions(url=server.url, requests=1, timeout_s=5))
    assert report.server.kind == "openai-compatible"
    assert report.server.apis == {"api/v1": False, "api/v0": False, "v1": True}
    assert [(m.id, m.state) for m in report.models] == [("gpt-local", "unknown")]
    assert report.generations is not None and report.generations.failure_ratio == 1 and report.escalate


# --- units -----------------------------------------------------------------------------------------


def attempt(silence: float, heartbeats: int = 0) -> Attempt:
    return Attempt(ok=True, latency_s=1.0, longest_silence_s=silence, heartbeats=heartbeats)


@pytest.mark.parametrize(
    ("heartbeat_s", "attempts", "verdict"),
    [
        (10.0, [attempt(1.0, heartbeats=3)], "ok"),
        (10.0, [attempt(14.0, heartbeats=3)], "ok"),  # within 1.5 heartbeats: scheduling slack
        (10.0, [attempt(1.0), attempt(16.0)], "fail"),
        (10.0, [attempt(2.0)], "untested"),
        (None, [attempt(30.0)], "untested"),
        (10.0, [], "untested"),
    ],
)
def test_heartbeat_verdicts(heartbeat_s: float | None, attempts: list[Attempt], verdict: str) -> None:
    assert judge_heartbeat(heartbeat_s, attempts, "the generations").verdict == verdict


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    assert percentiles_ms([]) is None
    assert percentiles_ms([0.1]) == {"p50": 100, "p95": 100, "p99": 100}
    assert percentiles_ms([i / 1000 for i in range(1, 101)]) == {"p50": 50, "p95": 95, "p99": 99}


async def test_progress_is_reported_after_each_generation() -> None:
    seen: list[tuple[int, int, int]] = []
    async with Simulator(models=models()) as sim:
        await diagnose(DoctorOptions(url=sim.url, requests=3, concurrency=1), progress=partial(_note, seen))
    assert seen == [(1, 3, 0), (2, 3, 0), (3, 3, 0)]


def _note(seen: list[tuple[int, int, int]], done: int, total: int, failed: int) -> None:
    seen.append((done, total, failed))


# --- several upstreams -----------------------------------------------------------------------------


async def test_with_a_config_naming_several_upstreams_it_checks_each_and_reports_lmgates_view(tmp_path: Path) -> None:
    """Two upstreams answer, one does not: the report shows lmgate's card for each and each one asked
    directly; the one down is a warning (lmgate routes around it), not an escalation."""
    async with Simulator(models=[SimModel(id="beta")]) as gone:
        pass  # its port is closed from here on
    async with Simulator(models=models()) as a, Simulator(models=[SimModel(id="beta", loaded=True)]) as b:
        document = {"upstreams": [{"name": "studio-a", "url": a.url}, {"name": "studio-b", "url": b.url},
                                  {"name": "studio-c", "url": gone.url}]}
        async with serve_gateway(Config.model_validate(document)) as (url, _):
            config = tmp_path / "lmgate.yaml"
            config.write_text(yaml.safe_dump({**document, "listen": {"port": urlsplit(url).port}}))
            code, out = await doctor("--config", str(config), "-n", "2")
            json_code, printed = await doctor("--config", str(config), "-n", "2", "--json")
    assert code == 0, out
    lines = out.splitlines()
    seen = lines.index("Upstreams    as lmgate sees them")
    assert lines[seen + 1].split() == ["studio-a", a.url, "reachable,", "1", "loaded", f"({FAST}),", "0/4", "slots",
                                       "in", "use,", "circuit", "closed"]
    assert lines[seen + 2].split()[:4] == ["studio-b", b.url, "reachable,", "1"]
    assert lines[seen + 3].startswith(f"             studio-c  {gone.url}  not reachable: The upstream could not be")
    direct = lines.index("Upstreams    asked directly (--config)")
    assert lines[direct + 1].split() == ["studio-a", a.url, "LM", "Studio,", "answered", "in", *lines[direct + 1].split()[6:8],
                                         "3", "model(s),", "1", "loaded"]
    assert "studio-b" in lines[direct + 2] and "not reachable: nothing answered at" in lines[direct + 3]
    assert "warning  lmgate cannot reach upstream studio-c" in out
    assert "warning  From here, nothing answers at upstream studio-c" in out
    assert "ESCALATE" not in out
    report = json.loads(printed)
    assert json_code == 0
    assert [(u["name"], u["seen_by"], u["reachable"]) for u in report["upstreams"]] == [
        ("studio-a", "lmgate", True), ("studio-b", "lmgate", True), ("studio-c", "lmgate", False),
        ("studio-a", "direct", True), ("studio-b", "direct", True), ("studio-c", "direct", False),
    ]
    assert report["upstreams"][1]["loaded"] == ["beta"] and report["upstreams"][4]["kind"] == "lm-studio"


async def test_pointed_at_lmgate_without_config_it_reads_the_upstreams_from_lmgate() -> None:
    async with Simulator(models=models()) as a, Simulator(models=[SimModel(id="beta", loaded=True)]) as b:
        document = {"upstreams": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}]}
        async with serve_gateway(Config.model_validate(document)) as (url, _):
            report = await diagnose(DoctorOptions(url=url, requests=2))
        async with lmgate_in_front(a) as single:
            alone = await diagnose(DoctorOptions(url=single, requests=2))
    assert [(u.name, u.url, u.seen_by, u.reachable, u.loaded) for u in report.upstreams] == [
        ("a", a.url, "lmgate", True, [FAST]), ("b", b.url, "lmgate", True, ["beta"])
    ]
    assert report.generations is not None and not report.generations.failures
    assert alone.upstreams == []  # one upstream: the server's own check says it all, as before
