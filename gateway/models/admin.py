"""``/lmgate/models``: what lmgate knows about the upstream's models, and loading or unloading one.

* ``GET /lmgate/models``: every model with its state, load durations, last use, requests in
  flight or waiting for a load, and the service's own state (refresh, loads under way, readiness).
* ``GET /lmgate/models/{id}``: one model (ids may contain ``/``).
* ``POST /lmgate/models/{id}/load``: load it now, single flight with requests (200 once loaded;
  ``502 model_load_failed`` with LM Studio's message).
* ``POST /lmgate/models/{id}/unload``: unload every instance (``{id}`` may name one instance,
  ``key:2``). Refused with ``409 model_busy`` while requests use it, unless ``?force=true``: LM
  Studio fails every request on an instance it unloads.

These routes are reached only through lmgate's own routes (outside the resilience layers). Once
lmgate has client keys, the POST routes are for the admin key only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio

from gateway.admin.routes import send_json
from gateway.models.upstream import ModelApiError, NotSupported
from gateway.request.routes import route_path
from middleware import errors
from middleware.errors import ClientError, NotFound, UpstreamUnavailable
from middleware.types import Scope, Send

if TYPE_CHECKING:
    from gateway.models.service import ModelService

MODELS_PATH = "/lmgate/models"
#: The upstream a load of a model goes to when the admin names none (the router's choice).
Choose = Callable[[str], Awaitable[str]]
_ACTIONS = ("load", "unload")


class MethodNotAllowed(ClientError):
    status, code, type = 405, "method_not_allowed", "invalid_request_error"
    default_message = "This route does not accept that method."


class ModelPinned(ClientError):
    status, code, type = 409, "model_pinned", "invalid_request_error"
    default_message = "models.pin keeps this model off that upstream."


class ModelBusy(ClientError):
    status, code, type = 409, "model_busy", "invalid_request_error"
    default_message = "The model is serving requests; unloading it would fail them. Add ?force=true to do it anyway."


class NotSupportedByUpstream(errors.UpstreamError):
    status, code, type = 501, "not_supported", "server_error"
    upstream_fault = False  # the upstream works; it has no such API
    default_message = "The upstream has no API for this."


def merged_snapshot(snapshots: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``GET /lmgate/models`` document of several upstreams: each one's own document under
    ``upstreams``, and every model of every upstream under ``models``, each entry naming its
    ``upstream`` (a model loaded on two upstreams appears twice)."""
    documents = list(snapshots.values())
    return {
        "upstream": ", ".join(document["upstream"] for document in documents),
        "api": next((document["api"] for document in documents if document["api"]), None),
        "refreshed_s_ago": max((d["refreshed_s_ago"] for d in documents if d["refreshed_s_ago"] is not None), default=None),
        "refresh_error": "; ".join(f"{name}: {d['refresh_error']}" for name, d in snapshots.items() if d["refresh_error"])
        or None,
        "ready": all(document["ready"] for document in documents),
        "preload_pending": sorted({model for document in documents for model in document["preload_pending"]}),
        "loads": {"in_progress": sorted({m for document in documents for m in document["loads"]["in_progress"]})},
        "models": [{**model, "upstream": name} for name, document in snapshots.items() for model in document["models"]],
        "upstreams": [{"name": name, **document} for name, document in snapshots.items()],
    }


async def serve_models(
    services: Mapping[str, ModelService],
    scope: Scope,
    send: Send,
    *,
    choose: Choose | None = None,
    pins: Mapping[str, Collection[str]] | None = None,
) -> None:
    """Answer one request under ``/lmgate/models``, for one upstream or several (by name).

    With several, ``?upstream=NAME`` picks the upstream of a load or unload; without it a load
    goes where the router would send a request for the model (``choose``), and an unload unloads
    the model on every upstream that has it loaded.
    """
    if len(services) == 1:
        await _serve_one(next(iter(services.values())), scope, send)
        return
    rest = _rest(scope)
    method = scope["method"]
    async with anyio.create_task_group() as tg:
        for service in services.values():
            tg.start_soon(service.registry.refresh)  # on demand, when older than refresh_s
    if not rest:
        _allow(method, "GET", "HEAD")
        await send_json(send, 200, merged_snapshot({name: service.snapshot() for name, service in services.items()}))
        return
    model, _, action = rest.rpartition("/")
    if action not in _ACTIONS or not model:
        _allow(method, "GET", "HEAD")
        entries = {name: entry for name, service in services.items() if (entry := _entry(service, rest)) is not None}
        if not entries:
            raise NotFound(f"lmgate knows no model {rest!r}; GET {MODELS_PATH} lists the upstreams' models.")
        await send_json(send, 200, {"id": rest, "upstreams": entries})
        return
    _allow(method, "POST")
    named = _query(scope).get("upstream", [None])[-1]
    if named is not None and named not in services:
        raise NotFound(f"no upstream is called {named!r}; the upstreams are {', '.join(services)}.")
    if action == "load":
        pinned = (pins or {}).get(model)
        if named is not None and pinned is not None and named not in pinned:
            raise ModelPinned(
                f'The model "{model}" is pinned to {", ".join(pinned)} (models.pin); it is not loaded on {named}.'
            )
        name = named or (await choose(model) if choose is not None else next(iter(services)))
        job = await services[name].load(model)
        status = "already_loaded" if job is None else "loaded"
        seconds = None if job is None else job.seconds
        await send_json(send, 200, {"model": model, "upstream": name, "status": status, "load_s": seconds})
        return
    targets = [named] if named is not None else [
        name for name, service in services.items() if service.registry.state(model) in ("loaded", "loading")
    ]
    unloaded = {name: await _unload_one(services[name], scope, model) for name in targets}
    await send_json(send, 200, {"model": model, "unloaded": unloaded})


def _rest(scope: Scope) -> str:
    # The canonical path keeps an encoded slash as "%2F" (gateway/request/paths.py): here it is part of an id.
    return route_path(scope)[len(MODELS_PATH) :].strip("/").replace("%2F", "/")


def _query(scope: Scope) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


async def _serve_one(service: ModelService, scope: Scope, send: Send) -> None:
    rest = _rest(scope)
    method = scope["method"]
    await service.registry.refresh()  # on demand, when older than refresh_s
    if not rest:
        _allow(method, "GET", "HEAD")
        await send_json(send, 200, service.snapshot())
        return
    model, _, action = rest.rpartition("/")
    if action not in _ACTIONS or not model:
        _allow(method, "GET", "HEAD")
        await _describe(service, rest, send)
        return
    _allow(method, "POST")
    if action == "load":
        job = await service.load(model)
        status = "already_loaded" if job is None else "loaded"
        seconds = None if job is None else job.seconds
        await send_json(send, 200, {"model": model, "status": status, "load_s": seconds})
        return
    await _unload(service, scope, model, send)


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise MethodNotAllowed(
            f"{method} is not allowed here; use {' or '.join(allowed)}.", headers=[("allow", ", ".join(allowed))]
        )


def _entry(service: ModelService, model: str) -> dict[str, Any] | None:
    record = service.registry.find(model)
    if record is None:
        return None
    return next((m for m in service.snapshot()["models"] if m["id"] == record.id), None)


async def _describe(service: ModelService, model: str, send: Send) -> None:
    entry = _entry(service, model)
    if entry is None:
        raise NotFound(f"lmgate knows no model {model!r}; GET {MODELS_PATH} lists the upstream's models.")
    await send_json(send, 200, entry)


async def _unload(service: ModelService, scope: Scope, model: str, send: Send) -> None:
    await send_json(send, 200, {"model": model, "unloaded": await _unload_one(service, scope, model)})


async def _unload_one(service: ModelService, scope: Scope, model: str) -> list[str]:
    force = _query(scope).get("force", ["false"])[-1].lower() in ("1", "true", "yes")
    record = service.registry.find(model)
    if record is not None and record.in_flight and not force:
        raise ModelBusy(f'The model "{record.id}" is serving {record.in_flight} request(s); add ?force=true to unload anyway.')
    try:
        unloaded = await service.unload(model)
    except NotSupported as exc:
        raise NotSupportedByUpstream(str(exc)) from exc
    except ModelApiError as exc:
        raise UpstreamUnavailable(str(exc)) from exc
    return unloaded
