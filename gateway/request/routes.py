"""The routes lmgate forwards. Everything else is a 404: lmgate is never an open proxy.

No request can choose the upstream: the URL is always the configured upstream joined with the
request's canonical path (``gateway.request.paths``), and only LM Studio's routes, listed here exactly,
and the configured extra prefixes are accepted.

LM Studio's router (Express) ignores case and a trailing slash, so a path that reaches one of its
routes is spelled here as the route is (``/api/v1/MODELS/load/`` is ``/api/v1/models/load``): the
admin rule, the allow-list and validation then compare exact strings, and the proxy forwards the
same string. Parameters (a model key, a download job id) keep their case. lmgate's own routes
(``/healthz``, ``/lmgate/...``) are served by lmgate itself, exactly as spelled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from gateway.request.paths import (
    BadPath,
    ascii_lower,
    resolve_path,
    strip_credentials,
    wire_path,
)
from middleware.body import request_json
from middleware.types import ASGIApp, Receive, Scope, Send

LMSTUDIO_PATHS = frozenset(
    {
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/lmstudio-greeting",
    }
)
#: The families of LM Studio's native REST APIs (metrics label them ``prefix*``).
LMSTUDIO_PREFIXES = ("/api/v0/", "/api/v1/")
#: LM Studio's native REST routes (research §1.4, §1.5), exactly.
LMSTUDIO_API_PATHS = frozenset(
    {
        "/api/v0/models",
        "/api/v0/chat/completions",
        "/api/v0/completions",
        "/api/v0/embeddings",
        "/api/v1/chat",
        "/api/v1/models",
        "/api/v1/models/load",
        "/api/v1/models/unload",
        "/api/v1/models/download",
    }
)
#: Routes ending in one parameter: ``/api/v0/models/{model}``, ``.../download/status/{job_id}``.
PARAMETER_PREFIXES = ("/api/v0/models/", "/api/v1/models/download/status/")
FORWARDED_PATHS = LMSTUDIO_PATHS | LMSTUDIO_API_PATHS

#: POST routes whose JSON body names the ``model`` they run on: validation requires the field, and
#: the cold-start layer loads the model first.
INFERENCE_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/api/v0/chat/completions",
        "/api/v0/completions",
        "/api/v0/embeddings",
        "/api/v1/chat",
    }
)
# Routes whose event streams end with `data: [DONE]`; one that ends without it was cut.
DONE_TERMINATED = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/api/v0/chat/completions", "/api/v0/completions"}
)
# Non-streaming requests on these routes are streamed upstream and assembled (see assemble.py),
# into the whole answer of the route's kind (/api/v0's answers add stats, model_info, runtime).
ASSEMBLABLE = {
    "/v1/chat/completions": "chat",
    "/api/v0/chat/completions": "v0-chat",
    "/v1/completions": "text",
    "/api/v0/completions": "v0-text",
}


def assembled_routes(setting: Mapping[str, bool] | bool) -> dict[str, str]:
    """The assemblable routes (path -> kind) that ``routes.assemble_non_streaming`` leaves on:
    all or none, or per path (a path not named stays on)."""
    if isinstance(setting, bool):
        return dict(ASSEMBLABLE) if setting else {}
    return {path: kind for path, kind in ASSEMBLABLE.items() if setting.get(path, True)}


@dataclass(frozen=True, slots=True)
class RequestKind:
    """What the proxy asks the upstream for, decided from the request alone."""

    #: The kind of whole answer lmgate assembles from a stream (``ASSEMBLABLE``); None: relayed.
    assemble: str | None
    #: The upstream is asked for an event stream (by the client, or by lmgate to assemble one).
    expects_events: bool
    #: The route's event streams end with ``data: [DONE]`` (``DONE_TERMINATED``): one without was cut.
    ends_with_done: bool


def request_kind(scope: Scope, path: str, assembled: Mapping[str, str]) -> RequestKind:
    """``scope``'s kind on ``path`` (canonical), with ``assembled`` from :func:`assembled_routes`.

    A non-streaming POST on an assembled route is assembled; the body must have been read
    (``middleware.body``).
    """
    document = request_json(scope)
    kind = assembled.get(path)
    if kind is None or scope["method"] != "POST" or document is None or document.get("stream"):
        kind = None
    streams = kind is not None or (document or {}).get("stream") is True
    return RequestKind(assemble=kind, expects_events=streams, ends_with_done=path in DONE_TERMINATED)


class RouteTable:
    """Spells a path as the route it reaches (:meth:`normalise`) and decides whether it is forwarded."""

    def __init__(self, *, extra_prefixes: Iterable[str] = ()) -> None:
        extra = tuple(extra_prefixes)
        for prefix in extra:
            if not prefix.startswith("/"):
                raise ValueError(f"route prefix {prefix!r} must start with '/'")
            try:
                resolved = resolve_path(wire_path(prefix))
            except BadPath:
                resolved = None
            if resolved != prefix:
                raise ValueError(f"route prefix {prefix!r} is not a plain path (dot segments, '//', '%', ';')")
        self.extra_prefixes = extra

    def normalise(self, raw_path: bytes) -> str:
        """The canonical path of a client's raw path (below the mount point); ``BadPath`` (400)
        when it cannot be read one way only. The one normalisation every decision relies on."""
        return self.spell(resolve_path(raw_path))

    def spell(self, path: str) -> str:
        """A resolved path spelled as the route it reaches: LM Studio's in lower case without a
        trailing slash (Express matches either way), an extra prefix as configured; the rest as is."""
        folded = ascii_lower(path)
        bare = folded.rstrip("/") or "/"
        if bare in FORWARDED_PATHS:
            return bare
        for prefix in PARAMETER_PREFIXES:
            if folded.startswith(prefix) and len(bare) > len(prefix):
                return prefix + path[len(prefix) :].rstrip("/")
        for prefix in self.extra_prefixes:
            if folded.startswith(ascii_lower(prefix)):
                return prefix + path[len(prefix) :]
        return path

    def allows(self, path: str) -> bool:
        """Whether a canonical ``path`` is forwarded; a path not in canonical form never is."""
        if path in FORWARDED_PATHS:  # canonical as listed
            return True
        if not self.is_canonical(path):
            return False
        if any(path.startswith(prefix) and len(path) > len(prefix) for prefix in PARAMETER_PREFIXES):
            return True
        return path.startswith(self.extra_prefixes) if self.extra_prefixes else False

    def is_canonical(self, path: str) -> bool:
        try:
            return self.normalise(wire_path(path)) == path
        except (BadPath, UnicodeEncodeError):
            return False


class RequestNormalisation:
    """The outermost layer after error rendering: rewrites the request target once.

    ``scope["path"]`` and ``scope["raw_path"]`` become the canonical path (below the mount point,
    which is kept) and ``scope["query_string"]`` loses its credentials, so no later layer can read
    the client's spelling by mistake. A path that cannot be normalised is ``400 bad_request``.
    """

    def __init__(self, app: ASGIApp, *, routes: RouteTable) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        mount = _mount_point(scope)
        try:
            path = self.routes.normalise(route_raw_path(scope))
        except BadPath:
            if scope["type"] == "http":
                raise
            await send({"type": "websocket.close", "code": 1008})  # an upgrade refused: 403
            return
        mount_raw = wire_path(mount) if mount else b""
        scope = {
            **scope,
            "path": mount + path,
            "raw_path": mount_raw + wire_path(path),
            "query_string": strip_credentials(scope.get("query_string", b"")),
        }
        await self.app(scope, receive, send)


def _mount_point(scope: Scope) -> str:
    """``root_path`` when ``path`` lies below it (mounted), else ""."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return root
    return ""


def route_path(scope: Scope) -> str:
    """The request path below the mount point.

    Mounted in Starlette (``Mount("/llm", app)``), ``path`` keeps the prefix and ``root_path``
    names it; servers given ``--root-path`` do the same. Behind a prefix-stripping proxy
    ``root_path`` is empty and this is ``path`` itself.
    """
    path: str = scope["path"]
    mount = _mount_point(scope)
    return (path[len(mount) :] or "/") if mount else path


def upstream_target(upstream_url: str, scope: Scope) -> str:
    """The URL a request is forwarded to: ``upstream_url`` (no trailing slash) joined with the
    canonical path and the query without credentials.

    Built from the very path the route check and every other decision read
    (:mod:`gateway.request.paths`), never from the client's ``raw_path``.
    """
    url = upstream_url + wire_path(route_path(scope)).decode("ascii")
    query = strip_credentials(scope.get("query_string", b""))
    return f"{url}?{query.decode('latin-1')}" if query else url


def route_raw_path(scope: Scope) -> bytes:
    """``raw_path`` below the mount point: the client's bytes before ``RequestNormalisation``, the
    canonical path's after it. Without a usable ``raw_path``, ``path`` encoded again."""
    raw: bytes | None = scope.get("raw_path")
    mount = _mount_point(scope).encode("utf-8")
    if raw is not None and not mount:
        return raw
    if raw is not None and raw.startswith(mount) and raw[len(mount) : len(mount) + 1] in (b"/", b""):
        return raw[len(mount) :] or b"/"
    return quote(route_path(scope), safe="/").encode("ascii")
