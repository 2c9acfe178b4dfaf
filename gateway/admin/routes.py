"""lmgate's own routes: liveness, readiness, metrics, models, the LLM health check and the status page.

They sit outside the resilience layers so they answer while the upstream is saturated or failing.
They read the gateway through a :class:`~gateway.admin.view.GatewayView` (plain data, read-only)
and are handed the sub-apps they delegate to (``/lmgate/models``, the status page), so nothing
here imports the gateway that builds them.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from gateway.admin.openapi import OPENAPI_PATH
from gateway.admin.view import GatewayView
from gateway.request.paths import ascii_lower
from gateway.request.routes import route_path
from gateway.request.validation import InvalidRequest
from gateway.telemetry.health import readiness
from middleware.errors import NotFound
from middleware.response import header_value
from middleware.types import ASGIApp, Receive, Scope, Send

_EXACT = frozenset({"/healthz", "/readyz", "/metrics"})
LLM_HEALTH = "/lmgate/health/llm"
_LMSTUDIO_MODELS = "/api/v1/models"
_DOWNLOAD_STATUS = "/api/v1/models/download/status/"


def is_admin_path(path: str) -> bool:
    return path in _EXACT or path == "/lmgate" or path.startswith("/lmgate/")


def requires_admin_key(method: str, path: str) -> bool:
    """Whether a request needs an admin key (with auth on), decided for every method.

    ``path`` is canonical (``gateway.request.paths``). lmgate's own routes: any method but GET and HEAD
    (its actions). LM Studio's model management (``/api/v1/models`` and below: load, unload,
    download): everything but reading the list and a download's status, OPTIONS included. The
    comparison ignores ASCII case as LM Studio's router does, so a path that the route table did
    not spell (under an extra prefix) cannot slip past it either.
    """
    read = method in ("GET", "HEAD")
    if is_admin_path(path):
        return not read
    folded = ascii_lower(path)
    if folded == _LMSTUDIO_MODELS or folded.startswith(_LMSTUDIO_MODELS + "/"):
        readable = folded == _LMSTUDIO_MODELS or folded.startswith(_DOWNLOAD_STATUS)
        return not (read and readable)
    return False


async def send_json(send: Send, status: int, document: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(document, separators=(",", ":")).encode()
    start_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


class Pages(Protocol):
    """A sub-app that owns some of lmgate's paths (the status page)."""

    def serves(self, path: str) -> bool: ...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class AdminRoutes:
    def __init__(self, view: GatewayView, *, openapi: dict[str, Any], models: ASGIApp, pages: Pages) -> None:
        self.view = view
        self.openapi = openapi
        self.models = models  # /lmgate/models...
        self.pages = pages  # GET /lmgate/ and /lmgate/status.json

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["method"] not in ("GET", "HEAD") and (path in _EXACT or path in (LLM_HEALTH, OPENAPI_PATH)):
            raise InvalidRequest(  # as the forwarded routes answer a wrong method
                f"{path} accepts GET, HEAD, not {scope['method']}.",
                status=405,
                code="method_not_allowed",
                headers=[("Allow", "GET, HEAD")],
            )
        if path == "/healthz":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            await self._readyz(send)
        elif path == "/metrics" and (exposition := self._exposition(scope)) is not None:
            await _send_metrics(send, *exposition)
        elif path == LLM_HEALTH:
            await send_json(send, *await self.view.llm_health())
        elif path == "/lmgate/models" or path.startswith("/lmgate/models/"):
            await self.models(scope, receive, send)
        elif path == OPENAPI_PATH:
            root = scope.get("root_path", "")  # mounted: the paths are below the mount point
            await send_json(send, 200, {**self.openapi, "servers": [{"url": root}]} if root else self.openapi)
        elif self.pages.serves(path):
            await self.pages(scope, receive, send)
        else:
            raise NotFound(f"lmgate has no route {path!r}.")

    async def _readyz(self, send: Send) -> None:
        """From known state only (gateway.telemetry.health.readiness): never an upstream request."""
        facts = self.view.readiness()
        if facts.preload_pending:  # models.preload still loading
            await send_json(send, 503, {"status": "preloading", "models": sorted(facts.preload_pending)})
            return
        status, body = readiness(
            draining=facts.draining, preloaded=facts.preloaded, circuit=facts.circuit, unreachable=facts.unreachable
        )
        if facts.shared_state is not None:
            # Redis down degrades (local limits), it does not stop serving: still ready.
            body = {**body, "shared_state": facts.shared_state}
        await send_json(send, status, body)

    def _exposition(self, scope: Scope) -> tuple[bytes, str] | None:
        accept = header_value(scope.get("headers", ()), b"accept")
        return self.view.metrics(accept.decode("latin-1") if accept else None)


async def _send_metrics(send: Send, body: bytes, content_type: str) -> None:
    headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
