"""The routes lmgate forwards. Everything else is a 404: lmgate is never an open proxy.

No request can choose the upstream: the URL is always the configured upstream joined with the
request's path, and only paths on this list (or a configured extra prefix) are accepted.
"""

from __future__ import annotations

from collections.abc import Iterable

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
LMSTUDIO_PREFIXES = ("/api/v0/", "/api/v1/")

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


class RouteTable:
    """Decides whether a path may be forwarded."""

    def __init__(self, *, extra_prefixes: Iterable[str] = ()) -> None:
        extra = tuple(extra_prefixes)
        for prefix in extra:
            if not prefix.startswith("/"):
                raise ValueError(f"route prefix {prefix!r} must start with '/'")
        self.prefixes = LMSTUDIO_PREFIXES + extra

    def allows(self, path: str) -> bool:
        if not is_clean_path(path):
            return False
        return path in LMSTUDIO_PATHS or path.startswith(self.prefixes)


def is_clean_path(path: str) -> bool:
    """Reject dot segments, empty segments and backslashes: they could step outside a prefix."""
    if not path.startswith("/") or "\\" in path or "//" in path:
        return False
    return not any(segment in (".", "..") for segment in path.split("/"))


def route_path(scope: dict) -> str:
    """The request path below the mount point.

    Mounted in Starlette (``Mount("/llm", app)``), ``path`` keeps the prefix and ``root_path``
    names it; servers given ``--root-path`` do the same. Behind a prefix-stripping proxy
    ``root_path`` is empty and this is ``path`` itself.
    """
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def route_raw_path(scope: dict) -> bytes:
    """``raw_path`` (the client's exact encoding) below the mount point; falls back to ``path``."""
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        return route_path(scope).encode("utf-8")
    root = scope.get("root_path", "").encode("utf-8")
    if root and raw.startswith(root) and raw[len(root) : len(root) + 1] in (b"/", b""):
        return raw[len(root) :] or b"/"
    return raw
