"""Access control through a real lmgate: client keys, admin keys, open paths, per-key limits, LM
Studio's token kept to the upstream, and no open proxy."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import anyio
import pytest
import yaml

from gateway.simulator import Simulator
from middleware.auth import hash_key

pytestmark = pytest.mark.anyio

MODEL = "qwen2.5-7b-instruct"
CHAT = "/v1/chat/completions"
CLIENT, OTHER, ADMIN = "sk-client-aaaaaaaaaaaa", "sk-client-bbbbbbbbbbbb", "sk-admin-cccccccccccc"
TOKEN = "sk-lm-Abc12345:Zyx0987654321abcdEFGH"  # LM Studio's format, never to leave lmgate upstream-wards
AUTH = {"keys": [hash_key(CLIENT), hash_key(OTHER)], "admin_keys": [hash_key(ADMIN)]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_client_keys_guard_every_forwarded_route(sim, start_gateway, client):
    async with start_gateway(sim.url, auth=AUTH) as gw:
        for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("GET", "/api/v0/models"), ("GET", "/lmgate/health/llm")):
            refused = await client.request(method, gw.url + path, json=chat() if method == "POST" else None)
            assert refused.status_code == 401, path
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert sim.counters.requests == 0
        assert (await client.post(gw.url + CHAT, json=chat(), headers=bearer(CLIENT))).status_code == 200
        assert (await client.get(gw.url + "/v1/models", headers=bearer(ADMIN))).status_code == 200


async def test_health_and_metrics_are_open_by_default_and_can_be_protected(sim, start_gateway, client):
    async with start_gateway(sim.url, auth=AUTH) as gw:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(gw.url + path)).status_code in (200, 503), path
    async with start_gateway(sim.url, auth={**AUTH, "open_paths": ["/healthz"]}) as gw:
        assert (await client.get(gw.url + "/healthz")).status_code == 200
        assert (await client.get(gw.url + "/metrics")).status_code == 401
        assert (await client.get(gw.url + "/metrics", headers=bearer(CLIENT))).status_code == 200


@pytest.mark.parametrize("keys", [AUTH, {}], ids=["keys", "no keys"])
async def test_open_paths_can_be_open_to_this_machine_only(sim, start_gateway, client, keys):
    remote = {"X-Forwarded-For": "203.0.113.9"}  # as NGINX on this machine says a remote client's address
    async with start_gateway(sim.url, auth={**keys, "open_from": "loopback"}) as gw:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(gw.url + path)).status_code == 200, path
            refused = await client.get(gw.url + path, headers=remote)
            assert refused.status_code == (401 if keys else 403), path
            assert refused.json()["error"]["code"] == ("invalid_api_key" if keys else "permission_denied")
        if keys:
            assert (await client.get(gw.url + "/metrics", headers={**remote, **bearer(CLIENT)})).status_code == 200
        # The forwarded routes are as before: a key with keys configured, open without.
        listed = await client.get(gw.url + "/v1/models", headers=remote)
        assert listed.status_code == (401 if keys else 200)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/models/load", {"model": MODEL}),
        ("/api/v1/models/unload", {"instance_id": MODEL}),
        (f"/lmgate/models/{MODEL}/unload", None),
    ],
)
async def test_loading_and_unloading_models_needs_an_admin_key(sim, start_gateway, client, path, body):
    async with start_gateway(sim.url, auth=AUTH, models={"enabled": True}) as gw:
        before = sim.counters.requests
        denied = await client.post(gw.url + path, json=body, headers=bearer(CLIENT))
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
        assert sim.counters.unloads == 0 and sim.counters.loads_started == 0
        assert sim.counters.requests == before
        allowed = await client.post(gw.url + path, json=body, headers=bearer(ADMIN))
        assert allowed.status_code < 400, allowed.text


async def test_a_key_over_its_per_key_limit_gets_429_while_other_keys_are_served(start_gateway, client):
    async with Simulator(models=[slow_model()]) as sim, start_gateway(
        sim.url, auth={**AUTH, "per_key_limit": 1}
    ) as gw:
        async with client.stream("POST", gw.url + CHAT, json=chat(stream=True), headers=bearer(CLIENT)) as first:
            # Held in a name: an iterator dropped after one anext() is collected, and closing it
            # closes the stream, which frees the key's slot (lmgate notices a leaving client at once).
            chunks = first.aiter_raw()
            await anext(chunks)
            second = await client.post(gw.url + CHAT, json=chat(), headers=bearer(CLIENT))
            other = await client.post(gw.url + CHAT, json=chat(), headers=bearer(OTHER))
            await chunks.aclose()
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
        assert int(second.headers["retry-after"]) >= 1
        assert other.status_code == 200
        assert CLIENT not in json.dumps(gw.app.concurrency.snapshot() if gw.app.concurrency else {})


def slow_model():
    from gateway.simulator import SimModel

    return SimModel(id=MODEL, loaded=True, tokens_per_second=20.0, ttft_base_s=0.0, ttft_per_prompt_token_s=0.0)


# --- LM Studio's API token ------------------------------------------------------------------------


async def test_the_lm_studio_token_goes_upstream_and_the_clients_key_does_not(upstream, start_gateway, client):
    async def answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"object":"list","data":[]}'})

    upstream.handler = answer
    async with start_gateway(upstream.url, env={"LMSTUDIO_API_KEY": TOKEN}, auth=AUTH) as gw:
        for headers in (bearer(CLIENT), {"x-api-key": CLIENT}):
            assert (await client.get(gw.url + "/v1/models", headers=headers)).status_code == 200
    for scope, _ in upstream.requests:
        sent = dict(scope["headers"])
        assert sent[b"authorization"] == f"Bearer {TOKEN}".encode()
        assert CLIENT.encode() not in b"".join(v for _, v in scope["headers"])


async def test_an_azure_style_api_key_header_never_reaches_the_upstream(upstream, start_gateway, client):
    # Azure-style OpenAI clients send their key as `api-key`; lmgate strips every credential header.
    async def answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"object":"list","data":[]}'})

    upstream.handler = answer
    async with start_gateway(upstream.url, env={"LMSTUDIO_API_KEY": TOKEN}, auth=AUTH) as gw:
        headers = {**bearer(CLIENT), "api-key": "sk-azure-secret"}
        assert (await client.get(gw.url + "/v1/models", headers=headers)).status_code == 200
    (scope, _), = upstream.requests
    assert b"api-key" not in dict(scope["headers"]) and b"sk-azure-secret" not in b"".join(v for _, v in scope["headers"])


async def test_the_token_never_appears_in_logs_errors_or_the_client_answer(start_gateway, client, caplog):
    caplog.set_level(logging.DEBUG)
    async with (
        Simulator(models=[slow_model()], settings=sim_settings("a-different-token")) as sim,
        start_gateway(sim.url, env={"LMSTUDIO_API_KEY": TOKEN}) as gw,
    ):
        refused = await client.post(gw.url + CHAT, json=chat())
        streamed = await client.post(gw.url + CHAT, json=chat(stream=True))
        health = await client.get(gw.url + "/readyz")
    assert refused.status_code == 401  # LM Studio refused lmgate's token
    for text in (refused.text, streamed.text, health.text, caplog.text, json.dumps(dict(refused.headers))):
        assert TOKEN not in text and TOKEN.split(":")[1] not in text


async def test_an_upstream_error_quoting_the_token_is_redacted(upstream, start_gateway, client):
    async def quoting(scope, receive, send):
        body = json.dumps({"error": f"Malformed LM Studio API token provided: {TOKEN}. Ensure you..."}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    upstream.handler = quoting
    async with start_gateway(upstream.url, env={"LMSTUDIO_API_KEY": TOKEN}) as gw:
        response = await client.get(gw.url + "/v1/models")
    assert response.status_code == 401
    assert TOKEN not in response.text and "[redacted]" in response.text


def test_config_check_never_prints_the_token_or_a_misplaced_key(tmp_path):
    config = tmp_path / "lmgate.yaml"
    config.write_text(yaml.safe_dump({"upstream": {"api_key": TOKEN}, "auth": {"keys": [hash_key(CLIENT)]}}))
    check = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and TOKEN not in check.stdout + check.stderr
    config.write_text(yaml.safe_dump({"upstream": {"api_key": [TOKEN]}, "auth": {"keys": [CLIENT]}}))
    bad = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(config)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "upstream.api_key" in bad.stderr and "auth.keys" in bad.stderr
    assert TOKEN not in bad.stderr and CLIENT not in bad.stderr


def sim_settings(token: str):
    from gateway.simulator import SimSettings

    return SimSettings(api_token=token)


# --- no open proxy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example"},
        {"X-Forwarded-Host": "evil.example", "X-Upstream": "http://evil.example", "X-Original-URL": "http://evil.example/"},
        {"Forwarded": "host=evil.example;proto=http"},
    ],
)
async def test_no_header_picks_the_upstream(upstream, start_gateway, client, headers):
    async def answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"object":"list","data":[]}'})

    upstream.handler = answer
    async with start_gateway(upstream.url) as gw:
        response = await client.get(gw.url + "/v1/models", headers=headers)
    assert response.status_code == 200
    assert len(upstream.requests) == 1  # it reached the configured upstream, the only one


async def test_an_absolute_form_request_target_cannot_reach_another_host(upstream, start_gateway):
    def absolute_form(port: int) -> bytes:
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        return received

    async def answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    upstream.handler = answer
    async with start_gateway(upstream.url) as gw:
        answer_bytes = await anyio.to_thread.run_sync(absolute_form, int(gw.url.rsplit(":", 1)[1]))
    # Either refused, or served from the configured upstream: never fetched from evil.example.
    assert answer_bytes.startswith(b"HTTP/1.1 ")
    assert all(scope["server"][1] == int(upstream.url.rsplit(":", 1)[1]) for scope, _ in upstream.requests)


def test_credentials_in_the_upstream_url_are_refused():
    from gateway.config.settings import Config, ConfigError, load_config  # noqa: F401

    with pytest.raises(Exception, match="api_key_env"):
        Config.model_validate({"upstream": {"url": f"http://user:{TOKEN}@127.0.0.1:1234"}})


def test_a_rejected_upstream_url_is_not_echoed_with_its_credentials(tmp_path):
    config = tmp_path / "lmgate.yaml"
    config.write_text(yaml.safe_dump({"upstream": {"url": f"http://user:{TOKEN}@127.0.0.1:1234"}}))
    bad = subprocess.run([sys.executable, "-m", "gateway", "config", "check", str(config)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "upstream.url" in bad.stderr and TOKEN not in bad.stderr
