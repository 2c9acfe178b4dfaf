"""Who answers at the URL, which API generations it speaks, and what models it has.

LM Studio answers an unknown route with HTTP 200 and ``{"error": "Unexpected endpoint..."}``, so
an API counts as spoken only when its listing has its own shape (the same rule as
``gateway.models.upstream``). The listings are read here with their context lengths, which the
gateway itself does not need:

* ``/api/v1/models`` (LM Studio 0.4+): ``key``, ``loaded_instances[].config.context_length``;
* ``/api/v0/models`` (0.3.6+): ``state``, ``loaded_context_length``, ``max_context_length``;
* ``/v1/models``: ids only (any OpenAI-compatible server).

lmgate is recognised by ``GET /healthz``; in front of a server it also says which models are
*loading* (``GET /lmgate/models``), which no LM Studio listing can, and, with several upstreams,
how each one is doing (``GET /lmgate/status.json``'s ``upstreams``, else ``/lmgate/models``').
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from gateway.cli.doctor.report import ModelInfo, ServerInfo, UpstreamCheck
from gateway.proxy.upstream_errors import describe

LISTINGS = {"api/v1": "/api/v1/models", "api/v0": "/api/v0/models", "v1": "/v1/models"}


async def _get_json(client: httpx.AsyncClient, url: str) -> tuple[int, Any]:
    response = await client.get(url)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


async def probe_server(client: httpx.AsyncClient, url: str) -> tuple[ServerInfo, list[ModelInfo]]:
    """The server's kind and APIs, and its models (the newest listing that answered)."""
    server = ServerInfo(url=url)
    started = time.monotonic()
    try:
        status, health = await _get_json(client, url + "/healthz")
    except httpx.HTTPError as exc:
        server.error = f"nothing answered at {url}: {describe(exc)}"
        return server, []
    server.reachable = True
    server.latency_ms = round((time.monotonic() - started) * 1000)
    is_lmgate = status == 200 and isinstance(health, dict) and health.get("status") == "ok"
    models: list[ModelInfo] | None = None
    try:
        for api, path in LISTINGS.items():
            status, document = await _get_json(client, url + path)
            parsed = _parse(api, document) if status == 200 else None
            server.apis[api] = parsed is not None
            if parsed is not None and models is None:
                models = parsed
            if status == 401:
                server.error = f"GET {path} answered 401: send a key (--api-key-env)"
        if is_lmgate:
            _merge_lmgate_states(models or [], *await _get_json(client, url + "/lmgate/models"))
    except httpx.HTTPError as exc:
        server.error = f"the server stopped answering: {describe(exc)}"
    if is_lmgate:
        server.kind = "lmgate"
    elif server.apis.get("api/v1") or server.apis.get("api/v0"):
        server.kind = "lm-studio"
    elif server.apis.get("v1"):
        server.kind = "openai-compatible"
    return server, models or []


def _parse(api: str, document: Any) -> list[ModelInfo] | None:
    """The models of ``document`` if it has ``api``'s shape, else None."""
    entries = document.get("models" if api == "api/v1" else "data") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return None
    parse = {"api/v1": _v1, "api/v0": _v0, "v1": _openai}[api]
    models = [parse(entry) for entry in entries if isinstance(entry, dict)]
    parsed = [model for model in models if model is not None]
    return parsed if len(parsed) == len(models) else None  # one entry of another shape: not this api


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _v1(entry: dict[str, Any]) -> ModelInfo | None:
    if not isinstance(entry.get("key"), str):
        return None
    instances = [i for i in entry.get("loaded_instances") or () if isinstance(i, dict)]
    config = instances[0].get("config") if instances else None
    context = _int(config.get("context_length")) if isinstance(config, dict) else None
    state = "loaded" if instances else "not-loaded"
    return ModelInfo(entry["key"], entry.get("type"), state, context, _int(entry.get("max_context_length")))


def _v0(entry: dict[str, Any]) -> ModelInfo | None:
    if not isinstance(entry.get("id"), str) or entry.get("state") not in ("loaded", "not-loaded"):
        return None
    return ModelInfo(
        entry["id"], entry.get("type"), entry["state"], _int(entry.get("loaded_context_length")),
        _int(entry.get("max_context_length")),
    )


def _openai(entry: dict[str, Any]) -> ModelInfo | None:
    return ModelInfo(entry["id"]) if isinstance(entry.get("id"), str) else None


def _merge_lmgate_states(models: list[ModelInfo], status: int, document: Any) -> None:
    """lmgate knows more states than the listing (loading, failed): take them where it says."""
    entries = document.get("models") if status == 200 and isinstance(document, dict) else None
    states = {e["id"]: e["state"] for e in entries or () if isinstance(e, dict) and isinstance(e.get("id"), str)}
    for model in models:
        state = states.get(model.id)
        if state in ("loading", "failed") or (state is not None and model.state == "unknown"):
            model.state = state


async def lmgate_upstreams(client: httpx.AsyncClient, url: str) -> list[UpstreamCheck]:
    """An lmgate's upstreams as it sees them, when it has several (one: the server itself says it all).

    ``/lmgate/status.json`` has a card per upstream (reachable, circuit, slots, models loaded);
    an lmgate without it (older) still names them in ``/lmgate/models`` (``upstreams``).
    """
    status, document = await _get_json(client, url + "/lmgate/status.json")
    cards = document.get("upstreams") if status == 200 and isinstance(document, dict) else None
    if isinstance(cards, list):
        checks = [_from_card(card) for card in cards if isinstance(card, dict)]
    else:
        status, document = await _get_json(client, url + "/lmgate/models")
        listed = document.get("upstreams") if status == 200 and isinstance(document, dict) else None
        checks = [_from_models(entry) for entry in listed or () if isinstance(entry, dict)]
    found = [check for check in checks if check is not None]
    return found if len(found) > 1 else []


def _from_card(card: dict[str, Any]) -> UpstreamCheck | None:
    name, url = card.get("name"), card.get("url")
    if not isinstance(name, str) or not isinstance(url, str):
        return None
    slots = card.get("slots")
    loaded = card.get("loaded")
    return UpstreamCheck(
        name, url, "lmgate", reachable=card.get("reachable") is True, error=_str(card.get("refresh_error")),
        loaded=[m for m in loaded if isinstance(m, str)] if isinstance(loaded, list) else [],
        circuit=_str(card.get("circuit")),
        slots={k: v for k, v in slots.items() if isinstance(v, int)} if isinstance(slots, dict) else None,
    )


def _from_models(entry: dict[str, Any]) -> UpstreamCheck | None:
    name, url = entry.get("name"), entry.get("upstream")
    if not isinstance(name, str) or not isinstance(url, str):
        return None
    models = [m for m in entry.get("models") or () if isinstance(m, dict)]
    error = _str(entry.get("refresh_error"))
    return UpstreamCheck(
        name, url, "lmgate", reachable=error is None and entry.get("refreshed_s_ago") is not None, error=error,
        models=len(models), loaded=sorted(str(m.get("id")) for m in models if m.get("state") == "loaded"),
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


async def check_upstream(name: str, url: str, *, api_key: str | None, timeout_s: float) -> UpstreamCheck:
    """One upstream of the config, asked directly: does it answer, what is it, what has it loaded."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(connect=5.0, read=timeout_s, write=10.0, pool=timeout_s)
    async with httpx.AsyncClient(timeout=timeout, headers=headers, trust_env=False) as client:
        server, models = await probe_server(client, url)
    return UpstreamCheck(
        name, url, "direct", reachable=server.reachable, error=server.error, kind=server.kind,
        latency_ms=server.latency_ms, models=len(models) if server.reachable else None,
        loaded=[m.id for m in models if m.state == "loaded"],
    )


def pick_model(models: list[ModelInfo], wanted: str | None) -> str | None:
    """``wanted``, else the first loaded model that generates, else the first that generates."""
    if wanted:
        return wanted
    generating = [m for m in models if m.generates]
    candidates = [m for m in generating if m.state == "loaded"] or generating
    return candidates[0].id if candidates else None


async def unload(client: httpx.AsyncClient, server: ServerInfo, model: str) -> tuple[list[str], str | None]:
    """Unload every instance of ``model``: (instance ids, why not). Through lmgate, its own route
    (refused while requests use the model); at LM Studio 0.4+, ``POST /api/v1/models/unload``."""
    if server.kind == "lmgate":
        response = await client.post(f"{server.url}/lmgate/models/{model}/unload")
        if response.status_code != 200:
            return [], f"lmgate refused the unload (HTTP {response.status_code}): {_message(response)}"
        return list(response.json().get("unloaded") or []), None
    if not server.apis.get("api/v1"):
        return [], "unloading needs LM Studio 0.4's /api/v1; the model was measured as it was"
    status, document = await _get_json(client, server.url + LISTINGS["api/v1"])
    entry = next((e for e in (document or {}).get("models", []) if isinstance(e, dict) and e.get("key") == model), None)
    instances = [i["id"] for i in (entry or {}).get("loaded_instances") or () if isinstance(i, dict) and "id" in i]
    for instance in instances:
        response = await client.post(server.url + "/api/v1/models/unload", json={"instance_id": instance})
        if response.status_code != 200:
            return [], f"LM Studio refused to unload {instance} (HTTP {response.status_code}): {_message(response)}"
    return instances, None


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return response.text[:200]
    return str(error.get("message") if isinstance(error, dict) else error)[:200]
