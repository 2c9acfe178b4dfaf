"""A response cache for deterministic requests: the same question, asked again, answered at once.

Evaluation pipelines re-run the same prompts with ``temperature: 0`` (or a fixed ``seed``) and
expect the same answers; sending each of them to a local model again costs seconds per request
and, for a cold model, a whole load. This layer remembers complete, successful answers and replays
them, so a hit never reaches the model, never loads it and never takes a concurrency slot (put
the layer outside those).

A request is cacheable when it is a POST to one of ``paths`` (chat, completions, embeddings) whose
JSON body is deterministic: embeddings always; chat and completions with ``temperature`` 0 or an
integer ``seed``, and no ``tools`` or ``functions`` (a tool call may have side effects the caller
wants to happen again). Anything else passes through untouched and carries no header.

* **Key**: SHA-256 of the route and the canonical JSON body (sorted keys, no spaces), so key
  order and spacing do not matter but every field does, ``model`` and ``stream`` included: a
  streamed request is answered from a cached stream, a plain one from a cached JSON body.
* **Stored**: only a 200 that the inner app finished normally and that is no larger than
  ``max_entry_bytes``; a JSON body without an ``error`` member; an event stream whose last frame
  is ``data: [DONE]`` and that carries no ``event: error`` frame (never a cut one). SSE comment
  frames (heartbeats) are dropped from what is stored.
* **Replayed**: a cached stream frame by frame as ``text/event-stream``, a JSON body whole, with
  ``X-Lmgate-Cache: hit`` and ``Age``. Answers from the inner app carry ``X-Lmgate-Cache: miss``.
* **Cache-Control** from the client: ``no-cache`` skips the lookup (the fresh answer is stored);
  ``no-store`` skips both. Those answers carry ``X-Lmgate-Cache: bypass``.

The store is a :class:`CacheStore`; :class:`MemoryStore` (the default) is an LRU bounded by
entries and bytes, with a TTL. A shared store (Redis, memcached) implements the same three
methods. Two identical requests that miss at the same time both go to the upstream; the later
answer replaces the earlier one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from middleware.body import DEFAULT_LIMIT_BYTES, read_body, replaying_receive, request_json
from middleware.request_id import request_id
from middleware.response import header_value, is_event_stream
from middleware.types import ASGIApp, Clock, Message, Receive, Scope, Send

__all__ = [
    "CACHEABLE_PATHS",
    "CacheMiddleware",
    "CacheStats",
    "CacheStore",
    "CachedResponse",
    "MemoryStore",
    "cache_key",
    "is_deterministic",
]

CACHEABLE_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/v0/chat/completions",
        "/api/v0/completions",
        "/api/v0/embeddings",
    }
)
_EMBEDDINGS_SUFFIX = "/embeddings"
CACHE_HEADER = b"x-lmgate-cache"
Result = Literal["hit", "miss", "bypass"]
_DONE_FRAME = b"data: [DONE]"


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """One stored answer: a JSON body (``frames`` holds it alone) or the frames of an event stream."""

    content_type: bytes
    frames: tuple[bytes, ...]
    stream: bool
    stored_at: float

    @property
    def size(self) -> int:
        return sum(len(frame) for frame in self.frames)


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    bytes: int
    evictions: int


class CacheStore(Protocol):
    """Where answers live. Async, so a shared store over the network fits the same interface."""

    async def get(self, key: str) -> CachedResponse | None: ...

    async def put(self, key: str, response: CachedResponse, *, ttl_s: float) -> None: ...

    def stats(self) -> CacheStats: ...


class MemoryStore:
    """An in-process LRU, bounded by ``max_entries`` and ``max_bytes``; entries expire after their TTL.

    Expired entries are dropped when read, and before the least recently used ones when room is
    needed. ``clock`` is injectable for tests.
    """

    def __init__(self, *, max_entries: int, max_bytes: int, clock: Clock = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()

    async def get(self, key: str) -> CachedResponse | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires_at, response = item
        if self.clock() >= expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return response

    async def put(self, key: str, response: CachedResponse, *, ttl_s: float) -> None:
        size = response.size
        if size > self.max_bytes or self.max_entries < 1 or ttl_s <= 0:
            return
        if key in self._entries:
            self._drop(key)
        self._make_room(size)
        self._entries[key] = (self.clock() + ttl_s, response)
        self.bytes += size

    def stats(self) -> CacheStats:
        return CacheStats(entries=len(self._entries), bytes=self.bytes, evictions=self.evictions)

    def _make_room(self, size: int) -> None:
        now = self.clock()
        for key in [k for k, (expires_at, _) in self._entries.items() if expires_at <= now]:
            self._drop(key)
        while self._entries and (len(self._entries) >= self.max_entries or self.bytes + size > self.max_bytes):
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def _drop(self, key: str) -> None:
        _, response = self._entries.pop(key)
        self.bytes -= response.size


def is_deterministic(path: str, document: dict[str, Any]) -> bool:
    """Whether the same ``document`` sent to ``path`` yields the same answer (see the module docstring)."""
    if path.endswith(_EMBEDDINGS_SUFFIX):
        return True
    if document.get("tools") or document.get("functions"):
        return False
    temperature, seed = document.get("temperature"), document.get("seed")
    zero = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0
    seeded = isinstance(seed, int) and not isinstance(seed, bool)
    return zero or seeded


def cache_key(path: str, document: dict[str, Any]) -> str:
    """The route and the canonical body, hashed."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{path}\n{canonical}".encode()).hexdigest()


def _directives(scope: Scope) -> set[str]:
    value = header_value(scope.get("headers", ()), b"cache-control")
    if value is None:
        return set()
    return {part.strip().split("=", 1)[0].lower() for part in value.decode("latin-1").split(",")}


class CacheMiddleware:
    """Serve repeated deterministic requests from ``store``; see the module docstring.

    Options:
        store: a :class:`CacheStore` (``MemoryStore`` for one process).
        ttl_s: how long an answer is served from the cache.
        max_entry_bytes: larger answers are relayed but not stored (recording stops at this size).
        paths: routes that may be cached.
        on_result: called with ``"hit"``, ``"miss"`` or ``"bypass"`` per cacheable request (metrics).
        path_of: the request's path below any mount point (default ``scope["path"]``).
        clock: for ``Age`` (the store's own clock decides expiry).
        body_limit_bytes: the request body limit when this layer is the first to read it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: CacheStore,
        ttl_s: float = 3600.0,
        max_entry_bytes: int = 1024 * 1024,
        paths: Collection[str] = CACHEABLE_PATHS,
        on_result: Callable[[Result], None] | None = None,
        path_of: Callable[[Scope], str] = lambda scope: scope["path"],
        clock: Clock = time.monotonic,
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
    ) -> None:
        self.app = app
        self.store = store
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.paths = frozenset(paths)
        self.on_result = on_result
        self.path_of = path_of
        self.clock = clock
        self.body_limit_bytes = body_limit_bytes
        #: Cacheable requests by result since start (the status page; metrics use ``on_result``).
        self.results: dict[Result, int] = {"hit": 0, "miss": 0, "bypass": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = self.path_of(scope) if scope["type"] == "http" else ""
        if path not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        await read_body(scope, receive, limit_bytes=self.body_limit_bytes)
        receive = replaying_receive(scope, receive)
        document = request_json(scope)
        if document is None or not is_deterministic(path, document):
            await self.app(scope, receive, send)
            return
        key = cache_key(path, document)
        directives = _directives(scope)
        result: Result = "bypass" if directives & {"no-cache", "no-store"} else "miss"
        if result == "miss":
            cached = await self.store.get(key)
            if cached is not None:
                self._count("hit")
                await self._replay(scope, cached, send)
                return
        self._count(result)
        recorder = _Recorder(stream=document.get("stream") is True, limit_bytes=self.max_entry_bytes)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (CACHE_HEADER, result.encode())]}
            recorder.observe(message)
            await send(message)

        await self.app(scope, receive, recording_send)
        response = recorder.response(self.clock())
        if response is not None and "no-store" not in directives:
            await self.store.put(key, response, ttl_s=self.ttl_s)

    def _count(self, result: Result) -> None:
        self.results[result] += 1
        if self.on_result is not None:
            self.on_result(result)

    async def _replay(self, scope: Scope, cached: CachedResponse, send: Send) -> None:
        headers = [
            (b"content-type", cached.content_type),
            (b"x-request-id", request_id(scope).encode("ascii")),
            (CACHE_HEADER, b"hit"),
            (b"age", str(max(0, int(self.clock() - cached.stored_at))).encode("ascii")),
        ]
        if cached.stream:
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        else:
            headers.append((b"content-length", str(cached.size).encode("ascii")))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for frame in cached.frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Recorder:
    """Keeps a copy of one response while it is relayed, up to a size; judges whether it may be stored."""

    __slots__ = ("stream", "limit_bytes", "status", "content_type", "chunks", "size", "finished")

    def __init__(self, *, stream: bool, limit_bytes: int) -> None:
        self.stream = stream
        self.limit_bytes = limit_bytes
        self.status = 0
        self.content_type = b""
        self.chunks: list[bytes] | None = []  # None once the answer cannot be stored
        self.size = 0
        self.finished = False

    def observe(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            self.status = message["status"]
            self.content_type = header_value(headers, b"content-type") or b""
            if self.status != 200 or is_event_stream(headers) != self.stream:
                self.chunks = None
            return
        body = message.get("body", b"")
        if self.chunks is not None and body:
            self.size += len(body)
            if self.size > self.limit_bytes:
                self.chunks = None
            else:
                self.chunks.append(body)
        if not message.get("more_body", False):
            self.finished = True

    def response(self, now: float) -> CachedResponse | None:
        """The answer to store, or None (not a complete success, too large, or an error inside)."""
        if self.chunks is None or not self.finished:
            return None
        raw = b"".join(self.chunks)
        frames = _stream_frames(raw) if self.stream else _json_body(raw)
        if frames is None:
            return None
        return CachedResponse(content_type=self.content_type, frames=frames, stream=self.stream, stored_at=now)


def _json_body(raw: bytes) -> tuple[bytes, ...] | None:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return (raw,) if isinstance(document, dict) and "error" not in document else None


def _stream_frames(raw: bytes) -> tuple[bytes, ...] | None:
    """The data frames of a finished stream, each with its blank line; None if it did not end well."""
    frames = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line for line in block.split(b"\n") if line and not line.startswith(b":")]
        if not lines:
            continue  # empty, or a comment frame (a heartbeat)
        if any(line.startswith(b"event:") and line[6:].strip() == b"error" for line in lines):
            return None
        frames.append(b"\n".join(lines) + b"\n\n")
    if not frames or frames[-1].rstrip() != _DONE_FRAME:
        return None
    return tuple(frames)
