"""``build_stack``: every layer named, in request order, and the architecture page lists the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.app import build_app
from gateway.config.settings import Config
from gateway.proxy.relay import Proxy
from gateway.proxy.websocket import SdkSockets
from gateway.request.routes import RequestNormalisation
from gateway.stack import OwnRoutes
from gateway.telemetry import AdmissionMark, TelemetryMiddleware
from middleware.auth import AuthMiddleware
from middleware.body import BodyDeadlines
from middleware.errors import ErrorMiddleware

ROOT = Path(__file__).resolve().parents[2]
EVERY_LAYER = {
    "auth": {"keys": ["sha256:" + "0" * 64], "per_key_limit": 2},
    "cache": {"enabled": True},
    "models": {"enabled": True, "heartbeat_s": 5},
}
OUTERMOST_FIRST = [
    "errors",
    "request_normalisation",
    "sdk_sockets",
    "auth",
    "body_deadlines",
    "own_routes",
    "telemetry",
    "request_validation",
    "per_key_concurrency",
    "drain",
    "cache",
    "base64_embeddings",
    "heartbeat",
    "cold_start",
    "concurrency",
    "admission_mark",
    "timeout",
    "retry",
    "circuit_breaker",
]


def layer_names(config: Config) -> list[str]:
    return list(reversed(build_app(config).stack.layers))  # built innermost first


def test_every_layer_in_request_order() -> None:
    assert layer_names(Config.model_validate(EVERY_LAYER)) == OUTERMOST_FIRST


@pytest.mark.parametrize(
    ("config", "left_out"),
    [
        ({}, {"per_key_concurrency", "cache"}),
        ({"models": {"enabled": False, "heartbeat_s": None}}, {"per_key_concurrency", "cache", "heartbeat", "cold_start"}),
        ({"retry": {"max_retries": 0}, "circuit_breaker": {"enabled": False}, "concurrency": {"enabled": False}},
         {"per_key_concurrency", "cache", "retry", "circuit_breaker", "concurrency"}),
    ],
    ids=["defaults", "no-cold-starts", "no-resilience"],
)
def test_a_layer_turned_off_is_left_out_and_the_order_kept(config: dict[str, object], left_out: set[str]) -> None:
    assert layer_names(Config.model_validate(config)) == [name for name in OUTERMOST_FIRST if name not in left_out]


def test_the_outer_layers_and_the_terminal_app() -> None:
    app = build_app(Config())
    layers = app.stack.layers
    kinds = [ErrorMiddleware, RequestNormalisation, SdkSockets, AuthMiddleware, BodyDeadlines, OwnRoutes, TelemetryMiddleware]
    assert [type(layers[name]) for name in OUTERMOST_FIRST[: len(kinds)]] == kinds
    assert isinstance(layers["admission_mark"], AdmissionMark)
    assert isinstance(layers["circuit_breaker"].app, Proxy)  # type: ignore[attr-defined]
    assert app.breaker is layers["circuit_breaker"] and app.concurrency is layers["concurrency"]


def test_the_architecture_page_lists_the_stack() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert re.findall(r"^\| `(\w+)` \|", page, flags=re.MULTILINE) == OUTERMOST_FIRST
