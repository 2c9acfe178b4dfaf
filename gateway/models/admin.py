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

from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from gateway.admin.routes import send_json
from gateway.models.upstream import ModelApiError, NotSupported
from gateway.request.routes import route_path
from middleware import errors
from middleware.errors import ClientError, NotFound, UpstreamUnavailable
from middleware.types import Scope, Send

if TYPE_CHECKING:
    from gateway.models.service import ModelService

MODELS_PATH = "/lmgate/models"
_ACTIONS = ("load", "unload")


class MethodNotAllowed(ClientError):
    status, code, type = 405, "method_not_allowed", "invalid_request_error"
    default_message = "This route does not accept that method."


class ModelBusy(ClientError):
    status, code, type = 409, "model_busy", "invalid_request_error"
    default_message = "The model is serving requests; unloading it would fail them. Add ?force=true to do it anyway."


class NotSupportedByUpstream(errors.UpstreamError):
    status, code, type = 501, "not_supported", "server_error"
    upstream_fault = False  # the upstream works; it has no such API
    default_message = "The upstream has no API for this."


async def serve_models(service: ModelService, scope: Scope, send: Send) -> None:
    """Answer one request under ``/lmgate/models``."""
    # The canonical path keeps an encoded slash as "%2F" (gateway/request/paths.py): here it is part of an id.
    rest = route_path(scope)[len(MODELS_PATH) :].strip("/").replace("%2F", "/")
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


async def _describe(service: ModelService, model: str, send: Send) -> None:
    snapshot = service.snapshot()
    record = service.registry.find(model)
    entry = next((m for m in snapshot["models"] if record is not None and m["id"] == record.id), None)
    if entry is None:
        raise NotFound(f"lmgate knows no model {model!r}; GET {MODELS_PATH} lists the upstream's models.")
    await send_json(send, 200, entry)


async def _unload(service: ModelService, scope: Scope, model: str, send: Send) -> None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    force = query.get("force", ["false"])[-1].lower() in ("1", "true", "yes")
    record = service.registry.find(model)
    if record is not None and record.in_flight and not force:
        raise ModelBusy(f'The model "{record.id}" is serving {record.in_flight} request(s); add ?force=true to unload anyway.')
    try:
        unloaded = await service.unload(model)
    except NotSupported as exc:
        raise NotSupportedByUpstream(str(exc)) from exc
    except ModelApiError as exc:
        raise UpstreamUnavailable(str(exc)) from exc
    await send_json(send, 200, {"model": model, "unloaded": unloaded})
