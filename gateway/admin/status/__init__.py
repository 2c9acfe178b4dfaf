"""The status page: ``GET /lmgate/`` (one self-contained HTML file) and ``GET /lmgate/status.json``.

An operator wants one glance at "is it loading, is it queueing, is it failing?" without a
Grafana. The page is a static file shipped with the package (inline CSS and JS: no build step,
no CDN, nothing fetched but the JSON), polling ``status.json`` once a second (``?interval=ms``).
The JSON gathers what the gateway's parts already know:

* ``models``: the cold-start service's snapshot; a loading model has ``loading.elapsed_s`` and
  ``loading.expected_s`` (its median load, or one scaled by size from other models), drawn as
  "loading… 23 s / ~40 s";
* ``upstreams``: one card per upstream (``name``, ``url``, ``reachable``, ``refresh_error``,
  ``circuit``, ``slots`` in use/queued/limit, models ``loaded`` and ``loading``); one card with
  a single upstream;
* ``concurrency`` (in flight, queued, limit per key; ``<upstream>/<key>`` with several upstreams),
  ``breakers`` (each circuit's state), ``draining`` and ``in_flight``;
* ``latency``: the telemetry layer's rolling p50/p95/p99 of latency and time to first token per
  model, and ``series``, the latest requests' timings for the chart;
* ``errors``: counts by category over the last five minutes and the latest errors;
* ``cache``: the response cache's size and lookups, when it is on; with Redis, its numbers are
  the local fallback store's and ``shared`` counts the answers every replica shares;
* ``shared_state``: with ``state.redis_url``, whether Redis answers (``available``, ``for_s``,
  ``last_error``); null without it.

It reads the gateway through a :class:`~gateway.admin.view.GatewayView` (plain data only); the
gateway registers the page's :class:`RequestBoard` as a telemetry observer.

Both routes sit with lmgate's other routes, outside the resilience layers, and need a key like
them once keys exist: the page asks for one when the JSON answers 401 and sends it as a bearer
token (kept in the tab's ``sessionStorage``). A browser cannot send that header when it loads the
page itself; add ``/lmgate/`` to ``auth.open_paths`` to serve the page (which holds no data)
without a key, or put the header in front with NGINX. See docs/status-page.md.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from gateway import __version__
from gateway.admin.routes import send_json
from gateway.admin.status.board import RequestBoard
from gateway.admin.view import GatewayView
from gateway.models.admin import MethodNotAllowed
from gateway.request.routes import route_path
from middleware.types import Receive, Scope, Send

__all__ = ["PAGE_PATHS", "STATUS_JSON", "RequestBoard", "StatusPage"]

PAGE_PATHS = frozenset({"/lmgate", "/lmgate/"})
STATUS_JSON = "/lmgate/status.json"
_HTML_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    # The page needs nothing from elsewhere; say so, so a script injected into it can fetch nothing either.
    (b"content-security-policy", (b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                  b"img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'")),
    (b"x-content-type-options", b"nosniff"),
]


class StatusPage:
    """Serves the page and its JSON for one gateway; see the module docstring."""

    def __init__(self, view: GatewayView, *, board: RequestBoard) -> None:
        self.view = view
        self.board = board  # fed by telemetry (Telemetry.on_request_end)
        self.started_at = time.monotonic()
        self._html = resources.files(__package__).joinpath("index.html").read_bytes()

    @staticmethod
    def serves(path: str) -> bool:
        return path in PAGE_PATHS or path == STATUS_JSON

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{scope['method']} is not allowed here; use GET.", headers=[("allow", "GET, HEAD")])
        if route_path(scope) == STATUS_JSON:
            await send_json(send, 200, await self.document())
            return
        headers = [*_HTML_HEADERS, (b"content-length", str(len(self._html)).encode("ascii"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else self._html})

    async def document(self) -> dict[str, Any]:
        """The ``status.json`` document."""
        view = self.view
        snapshot = await view.models()  # refreshed on demand, when older than models.refresh_s
        for model in snapshot["models"]:
            if model["loading"] is not None:
                expected = view.expected_load_s(model["id"])
                model["loading"]["expected_s"] = round(expected, 1) if expected is not None else None
        drain = view.drain()
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at),
            "upstream": {"url": snapshot["upstream"], "api": snapshot["api"], "refresh_error": snapshot["refresh_error"]},
            "ready": snapshot["ready"],
            "draining": drain.draining,
            "in_flight": drain.in_flight,
            "models": snapshot["models"],
            "upstreams": view.upstreams(),
            "concurrency": view.concurrency(),
            "breakers": view.breakers(),
            "latency": view.latency(),
            "series": self.board.series(),
            "errors": self.board.errors(),
            "cache": view.cache(),
            "shared_state": view.shared_state(),
        }
