"""Base64EmbeddingsMiddleware: which answers it encodes, how, and what it leaves alone.

Driven in-process with a scripted inner app. The official SDKs (Python and Node) through a real
lmgate in front of the simulator are in tests/gateway/test_embeddings_base64.py.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable
from typing import Any

import anyio
import pytest

from middleware.embeddings import Base64EmbeddingsMiddleware, encode_embeddings
from middleware.types import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio

EMBEDDINGS = "/v1/embeddings"
VECTORS = [[0.1, -0.25, 3], [1e-8, 0.0, -1.0]]
ANSWER = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(VECTORS)],
    "model": "nomic-é",  # a non-ASCII id must survive re-serialisation
    "usage": {"prompt_tokens": 0, "total_tokens": 0},
}


def floats_of(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded, validate=True)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def float32(values: Iterable[float]) -> list[float]:
    return [struct.unpack("<f", struct.pack("<f", v))[0] for v in values]


class Inner:
    """Answers every request with ``status``, ``headers`` and ``chunks``; records what it received."""

    def __init__(
        self,
        chunks: Iterable[bytes] | None = None,
        *,
        status: int = 200,
        headers: Iterable[tuple[bytes, bytes]] = ((b"content-type", b"application/json; charset=utf-8"),),
    ) -> None:
        self.chunks = list(chunks) if chunks is not None else [json.dumps(ANSWER, ensure_ascii=False).encode()]
        self.status = status
        self.headers = list(headers)
        self.received: bytes | None = None
        self.raise_after: Exception | None = None
        self.sent_all = anyio.Event()
        self.hold: anyio.Event | None = None  # when set: the final empty chunk waits for it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.received = message.get("body")
        length = sum(len(c) for c in self.chunks)
        headers = [*self.headers, (b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        self.sent_all.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.raise_after is not None:
            raise self.raise_after
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def call(
    app: Any, body: Any, *, path: str = EMBEDDINGS, method: str = "POST", sent: list[Message] | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through ``app``: (status, headers, the whole body)."""
    scope = {"type": "http", "method": method, "path": path, "headers": []}
    sent = [] if sent is None else sent
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            await anyio.sleep_forever()
        delivered = True
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def request(**extra: Any) -> dict[str, Any]:
    return {"model": "nomic-é", "input": ["a", "b"], "encoding_format": "base64", **extra}


async def test_floats_become_base64_float32_and_content_length_follows():
    inner = Inner()
    status, headers, body = await call(Base64EmbeddingsMiddleware(inner), request())
    document = json.loads(body)
    assert status == 200 and int(headers[b"content-length"]) == len(body)
    assert headers[b"content-type"] == b"application/json; charset=utf-8"
    assert [floats_of(item["embedding"]) for item in document["data"]] == [float32(v) for v in VECTORS]
    assert {**document, "data": None} == {**ANSWER, "data": None}  # everything else as it was
    assert [(item["object"], item["index"]) for item in document["data"]] == [("embedding", 0), ("embedding", 1)]
    assert json.loads(inner.received) == request()  # the inner app saw the client's body


async def test_the_native_route_is_encoded_too():
    _, _, body = await call(Base64EmbeddingsMiddleware(Inner()), request(), path="/api/v0/embeddings")
    assert isinstance(json.loads(body)["data"][0]["embedding"], str)


async def test_a_mounted_app_finds_its_route_through_path_of():
    app = Base64EmbeddingsMiddleware(Inner(), path_of=lambda scope: scope["path"].removeprefix("/llm"))
    _, _, body = await call(app, request(), path="/llm/v1/embeddings")
    assert isinstance(json.loads(body)["data"][0]["embedding"], str)


@pytest.mark.parametrize(
    ("path", "method", "body"),
    [
        (EMBEDDINGS, "POST", request(encoding_format="float")),
        (EMBEDDINGS, "POST", {k: v for k, v in request().items() if k != "encoding_format"}),
        (EMBEDDINGS, "POST", request(encoding_format="BASE64")),  # OpenAI's enum is lower case
        (EMBEDDINGS, "POST", b"not json"),
        (EMBEDDINGS, "POST", [request()]),  # JSON, but not an object
        ("/v1/chat/completions", "POST", request()),
        ("/v1/embeddingsx", "POST", request()),
        (EMBEDDINGS, "GET", request()),
    ],
)
async def test_requests_that_did_not_ask_for_base64_get_the_upstream_bytes(path, method, body):
    inner = Inner()
    status, headers, answer = await call(Base64EmbeddingsMiddleware(inner), body, path=path, method=method)
    assert (status, answer) == (200, inner.chunks[0])
    assert headers[b"content-length"] == str(len(inner.chunks[0])).encode()


@pytest.mark.parametrize(
    ("status", "headers", "chunks"),
    [
        (400, [(b"content-type", b"application/json")], [b'{"error":{"message":"Model \\"x\\" is not an embedding model."}}']),
        (500, [(b"content-type", b"application/json")], [json.dumps(ANSWER).encode()]),
        (200, [(b"content-type", b"text/event-stream")], [b'data: {"data":[{"embedding":[1.0]}]}\n\n']),
        (200, [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")], [b"\x1f\x8b..."]),
        (200, [(b"content-type", b"application/json")], [b'{"data":[{"embedding":"AACAPw=="}]}']),  # base64 already
        (200, [(b"content-type", b"application/json")], [b'{"data":[{"embedding":[true,false]}]}']),  # not numbers
        (200, [(b"content-type", b"application/json")], [b'{"data":[{"embedding":[[1.0]]}]}']),
        (200, [(b"content-type", b"application/json")], [b'{"object":"list","data":{}}']),
        (200, [(b"content-type", b"application/json")], [b'{"data":[{"embed', b'ding":[1.0]']),  # cut JSON
        (200, [], [json.dumps(ANSWER).encode()]),  # no content type: not ours to read
    ],
)
async def test_answers_it_cannot_or_need_not_encode_pass_byte_for_byte(status, headers, chunks):
    inner = Inner(chunks, status=status, headers=headers)
    got_status, got_headers, body = await call(Base64EmbeddingsMiddleware(inner), request())
    assert (got_status, body) == (status, b"".join(chunks))
    assert got_headers == {**dict(headers), b"content-length": str(len(body)).encode()}


async def test_an_upstream_that_honours_base64_is_left_alone_item_by_item():
    mixed = {"data": [{"embedding": "AACAPw==", "index": 0}, {"embedding": [1.5], "index": 1}]}
    _, _, body = await call(Base64EmbeddingsMiddleware(Inner([json.dumps(mixed).encode()])), request())
    data = json.loads(body)["data"]
    assert data[0]["embedding"] == "AACAPw==" and floats_of(data[1]["embedding"]) == [1.5]


async def test_the_answer_is_assembled_from_every_chunk():
    raw = json.dumps(ANSWER).encode()
    chunks = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    sent: list[Message] = []
    _, _, body = await call(Base64EmbeddingsMiddleware(Inner(chunks)), request(), sent=sent)
    assert [floats_of(item["embedding"]) for item in json.loads(body)["data"]] == [float32(v) for v in VECTORS]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_beyond_the_limit_the_answer_streams_through_unchanged():
    raw = json.dumps(ANSWER).encode()
    chunks = [raw[:40], raw[40:80], raw[80:]]
    inner = Inner(chunks)
    inner.hold = anyio.Event()
    sent: list[Message] = []
    app = Base64EmbeddingsMiddleware(inner, response_limit_bytes=50)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call(app, request(), sent=sent))
        with anyio.fail_after(5):
            await inner.sent_all.wait()
        assert b"".join(m.get("body", b"") for m in sent[1:]) == raw  # all of it, before the app ended
        inner.hold.set()
    assert sent[0]["status"] == 200 and dict(sent[0]["headers"])[b"content-length"] == str(len(raw)).encode()


async def test_a_failure_before_the_end_sends_nothing_and_propagates():
    inner = Inner()
    inner.raise_after = RuntimeError("upstream cut")
    sent: list[Message] = []
    with pytest.raises(RuntimeError, match="upstream cut"):
        await call(Base64EmbeddingsMiddleware(inner), request(), sent=sent)
    assert sent == []  # an error layer outside can still answer with a clean error


async def test_a_large_answer_is_encoded_off_the_event_loop_the_same_way():
    vectors = [[(i * 7 + j) / 1000.0 for j in range(1024)] for i in range(40)]
    answer = {"object": "list", "data": [{"embedding": v, "index": i} for i, v in enumerate(vectors)]}
    raw = json.dumps(answer).encode()
    assert len(raw) > 256 * 1024
    _, headers, body = await call(Base64EmbeddingsMiddleware(Inner([raw])), request())
    assert [floats_of(item["embedding"]) for item in json.loads(body)["data"]] == [float32(v) for v in vectors]
    assert int(headers[b"content-length"]) == len(body) < len(raw)


async def test_other_scopes_pass_straight_through():
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    await Base64EmbeddingsMiddleware(app)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_encode_embeddings_matches_openais_encoding():
    # The value OpenAI documents for [1.0]: the four little-endian bytes 00 00 80 3f.
    assert json.loads(encode_embeddings(b'{"data":[{"embedding":[1]}]}'))["data"][0]["embedding"] == "AACAPw=="
    assert json.loads(encode_embeddings(b'{"data":[{"embedding":[]}]}'))["data"][0]["embedding"] == ""
    assert encode_embeddings(b'{"data":[{"embedding":"AACAPw=="}]}') is None


def test_the_limit_is_validated():
    with pytest.raises(ValueError, match="response_limit_bytes"):
        Base64EmbeddingsMiddleware(Inner(), response_limit_bytes=0)
