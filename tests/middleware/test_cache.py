"""CacheMiddleware and MemoryStore: what is cacheable, what is stored, how hits are replayed.

Driven in-process with a scripted inner app that counts its calls: a hit is a request the inner
app never saw. The end-to-end behaviour (through the whole gateway, the simulator and a real
server) is in tests/gateway/test_cache_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest

from middleware.cache import CachedResponse, CacheMiddleware, MemoryStore, cache_key, is_deterministic
from middleware.types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
JSON_ANSWER = {"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": "ok"}}]}
SSE_FRAMES = (
    b'data: {"choices":[{"delta":{"content":"o"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"k"}}]}\n\n',
    b"data: [DONE]\n\n",
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Inner:
    """The app behind the cache: answers with ``status`` and ``chunks``, counting its calls."""

    def __init__(self, chunks: Iterable[bytes] = (), *, status: int = 200, stream: bool = False) -> None:
        self.chunks = list(chunks) or ([json.dumps(JSON_ANSWER).encode()] if not stream else list(SSE_FRAMES))
        self.status = status
        self.stream = stream
        self.calls = 0
        self.raise_after: Exception | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        request = await receive()
        assert request["type"] == "http.request" and request["body"]  # the replayed body
        content_type = b"text/event-stream" if self.stream else b"application/json"
        await send({"type": "http.response.start", "status": self.status, "headers": [(b"content-type", content_type)]})
        for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self.raise_after is not None:
            raise self.raise_after
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def call(app: Any, body: dict[str, Any], *, path: str = CHAT, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict[bytes, bytes], list[bytes]]:
    """One request through ``app``: (status, headers, body chunks)."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    chunks = [m["body"] for m in sent[1:] if m.get("body")]
    return start["status"], dict(start["headers"]), chunks


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, **extra}


def cached(inner: Inner, *, store: MemoryStore | None = None, clock: Clock | None = None, **options: Any) -> tuple[CacheMiddleware, list[str]]:
    results: list[str] = []
    clock = clock or Clock()
    app = CacheMiddleware(
        inner,
        store=store or MemoryStore(max_entries=10, max_bytes=10_000, clock=clock),
        on_result=results.append,
        clock=clock,
        **options,
    )
    return app, results


# --- what is cacheable ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (CHAT, {"temperature": 0}, True),
        (CHAT, {"temperature": 0.0}, True),
        (CHAT, {"temperature": 0.7, "seed": 42}, True),
        (CHAT, {}, False),  # the server's default temperature is not 0
        (CHAT, {"temperature": 0.7}, False),
        (CHAT, {"temperature": False}, False),
        (CHAT, {"seed": True}, False),
        (CHAT, {"seed": None, "temperature": 0.2}, False),
        (CHAT, {"temperature": 0, "tools": [{"type": "function", "function": {"name": "send_mail"}}]}, False),
        (CHAT, {"temperature": 0, "tools": []}, True),
        (CHAT, {"temperature": 0, "functions": [{"name": "f"}]}, False),
        ("/v1/embeddings", {"input": "x"}, True),
        ("/api/v0/embeddings", {"input": "x"}, True),
    ],
)
def test_deterministic_requests(path: str, body: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(path, {"model": "m", **body}) is expected


def test_key_ignores_key_order_but_not_values() -> None:
    assert cache_key(CHAT, {"a": 1, "b": 2}) == cache_key(CHAT, {"b": 2, "a": 1})
    assert cache_key(CHAT, {"a": 1}) != cache_key(CHAT, {"a": 2})
    assert cache_key(CHAT, {"a": 1}) != cache_key("/v1/completions", {"a": 1})
    assert cache_key(CHAT, chat(stream=True)) != cache_key(CHAT, chat(stream=False))


@pytest.mark.parametrize(
    ("method_path", "body"),
    [(CHAT, chat(temperature=0.9)), ("/v1/models", chat()), ("/v1/responses", chat())],
)
async def test_uncacheable_requests_pass_through_without_a_header(method_path: str, body: dict[str, Any]) -> None:
    inner = Inner()
    app, results = cached(inner)
    for _ in range(2):
        _, headers, _ = await call(app, body, path=method_path)
        assert b"x-lmgate-cache" not in headers
    assert inner.calls == 2 and results == []


# --- hits and misses -----------------------------------------------------------------------------


async def test_second_identical_request_is_a_hit_the_inner_app_never_sees() -> None:
    inner = Inner()
    clock = Clock()
    app, results = cached(inner, clock=clock)
    status, headers, body = await call(app, chat())
    assert (status, headers[b"x-lmgate-cache"]) == (200, b"miss")
    clock.now = 12.5
    status, headers, again = await call(app, {"temperature": 0, **chat()})  # other key order
    assert (status, headers[b"x-lmgate-cache"], headers[b"age"]) == (200, b"hit", b"12")
    assert b"".join(again) == b"".join(body)
    assert headers[b"content-length"] == str(len(b"".join(body))).encode()
    assert headers[b"content-type"] == b"application/json"
    assert inner.calls == 1 and results == ["miss", "hit"]


async def test_stream_hit_is_replayed_frame_by_frame_without_heartbeats() -> None:
    chunks = [b": lmgate loading model=m elapsed_s=1\n\n", SSE_FRAMES[0] + SSE_FRAMES[1][:10], SSE_FRAMES[1][10:], SSE_FRAMES[2]]
    inner = Inner(chunks, stream=True)
    app, _ = cached(inner)
    await call(app, chat(stream=True))
    status, headers, frames = await call(app, chat(stream=True))
    assert headers[b"x-lmgate-cache"] == b"hit" and headers[b"content-type"] == b"text/event-stream"
    assert headers[b"x-accel-buffering"] == b"no" and b"content-length" not in headers
    assert tuple(frames) == SSE_FRAMES
    # The plain request is its own key: it misses rather than getting a stream.
    _, headers, _ = await call(app, chat(stream=False))
    assert headers[b"x-lmgate-cache"] == b"miss"


@pytest.mark.parametrize(
    ("directive", "stores"),
    [("no-cache", True), ("No-Cache, max-age=0", True), ("no-store", False)],
)
async def test_client_cache_control_bypasses_the_lookup(directive: str, stores: bool) -> None:
    inner = Inner()
    app, results = cached(inner)
    await call(app, chat())
    _, headers, _ = await call(app, chat(), headers=[(b"cache-control", directive.encode())])
    assert headers[b"x-lmgate-cache"] == b"bypass" and inner.calls == 2
    assert results == ["miss", "bypass"]
    assert app.store.stats().entries == 1  # the first answer, replaced by the fresh one (or kept)


# --- what is never stored --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner", "body"),
    [
        (Inner(status=500), chat()),
        (Inner([b'{"error": {"message": "boom"}}']), chat()),
        (Inner([b'{"choices": [']), chat()),
        (Inner(SSE_FRAMES[:2], stream=True), chat(stream=True)),  # cut: no [DONE]
        (Inner([SSE_FRAMES[0], b'event: error\ndata: {"error": {"message": "x"}}\n\n', SSE_FRAMES[2]], stream=True), chat(stream=True)),
        (Inner(stream=True), chat()),  # an event stream for a request that did not ask for one
        (Inner([b"x" * 2000]), chat()),  # larger than max_entry_bytes
    ],
)
async def test_failures_cut_streams_and_large_answers_are_not_stored(inner: Inner, body: dict[str, Any]) -> None:
    app, _ = cached(inner, max_entry_bytes=1000)
    await call(app, body)
    _, headers, _ = await call(app, body)
    assert headers[b"x-lmgate-cache"] == b"miss" and inner.calls == 2


async def test_an_inner_exception_propagates_and_nothing_is_stored() -> None:
    inner = Inner(stream=True)
    inner.raise_after = RuntimeError("cut")
    app, _ = cached(inner)
    with pytest.raises(RuntimeError):
        await call(app, chat(stream=True))
    assert app.store.stats().entries == 0


# --- the store -------------------------------------------------------------------------------------


def entry(size: int, at: float = 0.0) -> CachedResponse:
    return CachedResponse(content_type=b"application/json", frames=(b"x" * size,), stream=False, stored_at=at)


async def test_store_evicts_least_recently_used_by_entries() -> None:
    store = MemoryStore(max_entries=2, max_bytes=1000)
    await store.put("a", entry(1), ttl_s=60)
    await store.put("b", entry(1), ttl_s=60)
    assert await store.get("a") is not None  # a is now the most recent
    await store.put("c", entry(1), ttl_s=60)
    assert await store.get("b") is None
    assert await store.get("a") is not None and await store.get("c") is not None
    assert store.stats().evictions == 1


async def test_store_is_bounded_by_bytes_and_replaces_a_key() -> None:
    store = MemoryStore(max_entries=10, max_bytes=100)
    await store.put("a", entry(60), ttl_s=60)
    await store.put("a", entry(50), ttl_s=60)
    assert store.stats().bytes == 50
    await store.put("b", entry(40), ttl_s=60)
    await store.put("c", entry(30), ttl_s=60)  # 120 bytes: a goes
    assert [await store.get(k) is not None for k in "abc"] == [False, True, True]
    await store.put("huge", entry(101), ttl_s=60)  # never fits: not stored, nothing evicted
    assert store.stats() == type(store.stats())(entries=2, bytes=70, evictions=1)


async def test_store_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=2, max_bytes=100, clock=clock)
    await store.put("a", entry(10), ttl_s=5)
    clock.now = 4.9
    assert await store.get("a") is not None
    clock.now = 5.0
    assert await store.get("a") is None and store.stats().bytes == 0


async def test_expired_entries_make_room_before_live_ones_are_evicted() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=2, max_bytes=100, clock=clock)
    await store.put("live", entry(10), ttl_s=100)
    await store.put("old", entry(10), ttl_s=1)
    clock.now = 2
    await store.put("new", entry(10), ttl_s=100)
    assert await store.get("live") is not None and store.stats().evictions == 0


async def test_zero_entries_disables_storing() -> None:
    store = MemoryStore(max_entries=0, max_bytes=100)
    await store.put("a", entry(1), ttl_s=60)
    assert store.stats().entries == 0
