"""What the proxy decides from the request alone: assembled or relayed, a stream or not, the body
sent upstream, the upstream URL; and that the proxy's modules import in any order."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from gateway.proxy.error_bodies import REDACTED, redact
from gateway.proxy.usage import upstream_body
from gateway.request.routes import (
    ASSEMBLABLE,
    RequestKind,
    assembled_routes,
    request_kind,
    upstream_target,
)
from middleware.body import read_body
from middleware.types import Message, Scope

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"


async def read_scope(method: str, path: str, body: bytes, query: bytes = b"") -> Scope:
    scope: Scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": []}

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    await read_body(scope, receive)
    return scope


@pytest.mark.parametrize(
    ("method", "path", "document", "expected"),
    [
        ("POST", CHAT, {"model": "m"}, RequestKind("chat", True, True)),
        ("POST", CHAT, {"model": "m", "stream": False}, RequestKind("chat", True, True)),
        ("POST", CHAT, {"model": "m", "stream": True}, RequestKind(None, True, True)),
        ("POST", "/api/v0/completions", {"prompt": "p"}, RequestKind("v0-text", True, True)),
        ("POST", "/v1/embeddings", {"input": "x"}, RequestKind(None, False, False)),
        ("POST", "/v1/responses", {"stream": True}, RequestKind(None, True, False)),
        ("GET", CHAT, None, RequestKind(None, False, True)),
        ("POST", CHAT, "not an object", RequestKind(None, False, True)),
    ],
)
async def test_the_request_kind_follows_route_method_and_stream(
    method: str, path: str, document: Any, expected: RequestKind
) -> None:
    scope = await read_scope(method, path, b"" if document is None else json.dumps(document).encode())
    assert request_kind(scope, path, ASSEMBLABLE) == expected


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (True, set(ASSEMBLABLE)),
        (False, set()),
        ({CHAT: False}, set(ASSEMBLABLE) - {CHAT}),  # a path not named stays on
    ],
)
def test_the_assembly_setting_picks_routes(setting: Any, expected: set[str]) -> None:
    assert set(assembled_routes(setting)) == expected


async def test_only_an_assembled_request_goes_upstream_as_a_stream_with_usage() -> None:
    body = b'{"model":"m","stream_options":{"x":1},"text":"\\ud800"}'
    scope = await read_scope("POST", CHAT, body)
    assert upstream_body(scope, body, assembled=False, strips_usage=False) is body
    sent = json.loads(upstream_body(scope, body, assembled=True, strips_usage=False))
    assert sent == {"model": "m", "stream": True, "stream_options": {"x": 1, "include_usage": True}, "text": "\ud800"}


async def test_the_upstream_url_is_the_canonical_path_without_credentials() -> None:
    scope = await read_scope("GET", "/api/v0/models/qwen", b"", query=b"api_key=s&x=1")
    assert upstream_target("http://u:1", scope) == "http://u:1/api/v0/models/qwen?x=1"
    assert upstream_target("http://u:1", {**scope, "query_string": b""}) == "http://u:1/api/v0/models/qwen"


def test_lmgates_token_is_redacted_from_an_error_body() -> None:
    assert redact(b'{"error":"bad key sk-up"}', "sk-up") == b'{"error":"bad key ' + REDACTED + b'"}'
    assert redact(b"sk-up", None) == b"sk-up"


@pytest.mark.parametrize("module", ["gateway.proxy.usage", "gateway.proxy.assemble", "gateway.proxy.relay"])
def test_each_proxy_module_imports_first(module: str) -> None:
    # gateway.telemetry imports gateway.proxy.usage: importing the proxy side first once failed.
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
