"""Structured logs: an eval pipeline's gen_request / gen_success / gen_error lines from real requests,
the stamps on every line, prompts kept out unless asked for, and the console format."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import build_app
from gateway.config.settings import Config
from gateway.server.serving import serve_in_background
from gateway.simulator import SimModel, Simulator
from gateway.telemetry.events import CATEGORIES, categorise
from gateway.telemetry.logs import configure_logging

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
PROMPT = "the secret prompt text"
CONFIGURED = ("lmgate", "hypercorn.error")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in CONFIGURED]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    model = SimModel(id=MODEL, loaded=True, tokens_per_second=2000.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)
    async with Simulator(models=[model]) as simulator:
        yield simulator


async def logged_lines(
    capsys: pytest.CaptureFixture[str], config: dict[str, Any], *bodies: dict[str, Any]
) -> list[dict[str, Any]]:
    """Send ``bodies`` through a gateway logging JSON to stdout; the parsed ``gen_*`` lines."""
    gateway_config = Config.model_validate(config)
    configure_logging(level="info", fmt="json", pipeline_version="eval-7", config_hash=gateway_config.digest())
    app = build_app(gateway_config)
    ended_send, ended = anyio.create_memory_object_stream[object](len(bodies))
    app.telemetry.on_request_end.append(lambda record, outcome: ended_send.send_nowait(outcome))
    async with serve_in_background(app) as server, httpx.AsyncClient(timeout=10, trust_env=False) as client:
        for body in bodies:
            await client.post(server.url + "/v1/chat/completions", json=body)
        with anyio.fail_after(5), ended_send, ended:
            for _ in bodies:
                await ended.receive()
    await app.aclose()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    for line in lines:
        assert (line["config_hash"], line["pipeline_version"]) == (gateway_config.digest(), "eval-7")
        assert line["ts"].endswith("Z") and "T" in line["ts"]
    return [line for line in lines if line["event"].startswith("gen_")]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], **extra}


async def test_a_stream_logs_request_and_success_in_the_seeds_shape(sim, capsys, restore_logging):
    request, success = await logged_lines(capsys, {"upstream": {"url": sim.url}}, chat(stream=True))
    assert request["event"] == "gen_request" and success["event"] == "gen_success"
    assert request["request_id"] == success["request_id"]
    assert {k: request[k] for k in ("model", "stream", "prompt_chars", "attempt", "timeout_ms")} == {
        "model": MODEL,
        "stream": True,
        "prompt_chars": len(PROMPT),
        "attempt": 1,
        "timeout_ms": 45000,
    }
    assert success["tokens_out"] == 24 and success["tokens_per_s"] > 0 and success["attempts"] == 1
    assert 0 <= success["ttft_ms"] <= success["latency_ms"]
    assert success["model_state"] in ("warm", "unknown")  # "unknown" without the cold-start layer
    assert PROMPT not in json.dumps([request, success])


async def test_prompts_appear_only_when_configured(sim, capsys, restore_logging):
    config = {"upstream": {"url": sim.url}, "logging": {"prompts": True}}
    request, _ = await logged_lines(capsys, config, chat())
    assert request["prompt"] == PROMPT


async def test_failures_log_gen_error_with_category_status_and_message(sim, capsys, restore_logging):
    config = {"upstream": {"url": "http://127.0.0.1:9"}, "retry": {"enabled": False}}
    _, unreachable = await logged_lines(capsys, config, chat())
    assert unreachable["event"] == "gen_error" and unreachable["level"] == "warning"
    assert (unreachable["error_category"], unreachable["status"], unreachable["attempt"]) == ("network", 502, 1)
    assert unreachable["message"].startswith("The upstream could not be reached")
    _, unknown = await logged_lines(capsys, {"upstream": {"url": sim.url}}, chat(model="no-such-model"))
    assert (unknown["error_category"], unknown["error_code"]) == ("model_not_found", "model_not_found")
    assert "no-such-model" in unknown["message"]


async def test_a_cold_start_reported_by_the_layers_is_logged(upstream, capsys, restore_logging):
    async def handler(scope, receive, send):
        if scope["path"] != "/v1/chat/completions":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        state = [(b"x-lmgate-model-state", b"cold"), (b"x-lmgate-load-ms", b"1500")]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), *state]})
        await send({"type": "http.response.body", "body": b'{"choices":[{"index":0,"message":{}}]}'})

    upstream.handler = handler
    config = {"upstream": {"url": upstream.url}, "routes": {"assemble_non_streaming": False}}
    _, success = await logged_lines(capsys, config, chat())
    assert (success["model_state"], success["load_ms"]) == ("cold", 1500)


def test_the_console_format_on_a_terminal(restore_logging, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    configure_logging(level="debug", fmt="auto", pipeline_version=None, config_hash="abc")
    logging.getLogger("lmgate.telemetry").info("model m loaded", extra={"event": "model_load", "load_ms": 1200})
    line = terminal.getvalue()
    assert "INFO" in line and "model m loaded" in line and "load_ms=1200" in line
    assert not line.startswith("{")


@pytest.mark.parametrize(
    ("code", "status", "category"),
    [
        ("invalid_api_key", 401, "auth"),
        (None, 403, "auth"),
        ("upstream_unavailable", 502, "network"),
        ("upstream_timeout", 504, "timeout"),
        ("timeout", 504, "timeout"),
        ("upstream_error", 500, "upstream_5xx"),
        (None, 503, "upstream_5xx"),
        ("context_length_exceeded", 400, "context_overflow"),
        ("model_not_found", 404, "model_not_found"),
        ("model_load_failed", 502, "model_load_failed"),
        ("overloaded", 503, "overloaded"),
        ("draining", 503, "overloaded"),
        ("circuit_open", 503, "circuit_open"),
        ("client_cancelled", 499, "client_cancelled"),
        ("stream_cut", 200, "stream_cut"),
        ("bad_request", 400, "bad_request"),
        (None, 422, "bad_request"),
        ("internal_error", 500, "internal"),
    ],
)
def test_error_categories(code, status, category):
    assert category in CATEGORIES
    assert categorise(code, status) == category
