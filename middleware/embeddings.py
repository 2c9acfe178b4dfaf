"""Base64 embeddings for a client that asked for them, when the upstream answered floats.

OpenAI's ``POST /v1/embeddings`` accepts ``"encoding_format": "base64"`` and then answers each
``embedding`` as a string: the base64 of the vector's little-endian float32 bytes. The official
Node SDK asks for base64 whenever its caller chose no format and, before openai 7.12, decodes
whatever comes back as base64. LM Studio ignores the field and always sends float arrays
(lmstudio-bug-tracker#756), so those SDKs hand their callers a vector a quarter as long and all
zeros, with no error; a caller that chose base64 itself gets floats where it expects a string.

This layer answers such a request the way OpenAI would:

* Only a ``POST`` to one of ``paths`` whose JSON body has ``"encoding_format": "base64"``; every
  other request passes through without a look at its response.
* Only a ``200`` ``application/json`` answer without a ``Content-Encoding``: errors, event
  streams and compressed bodies pass through untouched.
* The answer is held until it is complete, up to ``response_limit_bytes``. Beyond that the held
  bytes go out unchanged and the rest streams through: the client gets the upstream's floats, as
  it would without this layer, instead of lmgate holding an unbounded body.
* Each ``data[].embedding`` that is an array of numbers becomes its base64 float32 string; one that
  is already a string (an upstream that honours base64) is left alone. When nothing changed the
  upstream's bytes go out as they came; otherwise the JSON is re-serialised and
  ``Content-Length`` set to the new length.

Large answers are parsed in a worker thread, so a big batch does not stall the streams that share
the event loop. An exception from the inner app propagates with nothing sent, so an error layer
outside can still answer with a clean error instead of a cut body.
"""

from __future__ import annotations

import base64
import json
import sys
from array import array
from collections.abc import Callable, Collection
from typing import Any

import anyio

from middleware.body import DEFAULT_LIMIT_BYTES, read_body, replaying_receive, request_json
from middleware.response import header_value
from middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["EMBEDDINGS_PATHS", "Base64EmbeddingsMiddleware", "encode_embeddings"]

#: OpenAI's route and LM Studio's native one; both answer in OpenAI's shape.
EMBEDDINGS_PATHS: tuple[str, ...] = ("/v1/embeddings", "/api/v0/embeddings")
#: A float prints as 10-20 JSON bytes: 16 MiB is about a thousand 1024-dimension vectors.
DEFAULT_RESPONSE_LIMIT_BYTES = 16 * 1024 * 1024
# Below this a worker thread costs more than the parse it would take off the event loop.
_THREAD_THRESHOLD_BYTES = 256 * 1024


class Base64EmbeddingsMiddleware:
    """Encode float embeddings as base64 for requests that asked for base64; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        paths: Collection[str] = EMBEDDINGS_PATHS,
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        response_limit_bytes: int = DEFAULT_RESPONSE_LIMIT_BYTES,
        path_of: Callable[[Scope], str] = lambda scope: scope["path"],
    ) -> None:
        if response_limit_bytes < 1:
            raise ValueError(f"response_limit_bytes must be at least 1, got {response_limit_bytes}")
        self.app = app
        self.paths = frozenset(paths)
        self.body_limit_bytes = body_limit_bytes
        self.response_limit_bytes = response_limit_bytes
        self.path_of = path_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or self.path_of(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        await read_body(scope, receive, limit_bytes=self.body_limit_bytes)
        receive = replaying_receive(scope, receive)
        request = request_json(scope)
        if request is None or request.get("encoding_format") != "base64":
            await self.app(scope, receive, send)
            return

        held: list[Message] = []  # the start and the body chunks, while the answer may still change
        held_bytes = 0
        passing = False  # once True, every message goes straight out

        async def release() -> None:
            nonlocal passing
            passing = True
            for message in held:
                await send(message)
            held.clear()

        async def send_encoded(message: Message) -> None:
            nonlocal held_bytes
            if passing:
                await send(message)
                return
            if message["type"] == "http.response.start":
                held.append(message)
                if not _encodable(message):
                    await release()
                return
            if message["type"] != "http.response.body" or not held:
                held.append(message)  # not a plain body (trailers, zero-copy): hand everything over
                await release()
                return
            held.append(message)
            held_bytes += len(message.get("body", b""))
            if held_bytes > self.response_limit_bytes:
                await release()
            elif not message.get("more_body", False):
                await finish()

        async def finish() -> None:
            nonlocal passing
            start, body = held[0], b"".join(m.get("body", b"") for m in held[1:])
            encoded = await _encode_off_loop(body)
            if encoded is None:
                await release()  # nothing to change: the upstream's bytes, as they came
                return
            passing = True
            held.clear()
            headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(encoded)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": encoded, "more_body": False})

        await self.app(scope, receive, send_encoded)
        if held:  # the app returned without ending its body: send what it did send
            await release()


def _encodable(start: Message) -> bool:
    """A 200 JSON answer this layer can read: uncompressed, ``application/json``."""
    headers = start.get("headers", ())
    content_type = (header_value(headers, b"content-type") or b"").lower()
    encoding = (header_value(headers, b"content-encoding") or b"identity").lower()
    return start["status"] == 200 and content_type.startswith(b"application/json") and encoding == b"identity"


async def _encode_off_loop(body: bytes) -> bytes | None:
    if len(body) < _THREAD_THRESHOLD_BYTES:
        return encode_embeddings(body)
    return await anyio.to_thread.run_sync(encode_embeddings, body)


def encode_embeddings(body: bytes) -> bytes | None:
    """``body`` with every float-array ``data[].embedding`` as base64 float32; None if nothing changed.

    None also for a body that is not an embeddings list in JSON: it is not this layer's to judge.
    """
    try:
        document: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return None
    changed = False
    for item in data:
        vector = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vector, list) and all(type(v) is float or type(v) is int for v in vector):
            item["embedding"] = base64_float32(vector)
            changed = True
    if not changed:
        return None
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def base64_float32(vector: list[float]) -> str:
    """OpenAI's encoding: base64 of the little-endian float32 bytes (out-of-range values become inf)."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
