"""middleware.body: the body is read once, handed on as one RequestBody, and every limit holds."""

from __future__ import annotations

import pytest

from middleware.body import (
    REQUEST_BODY_KEY,
    RequestBody,
    model_of,
    read_body,
    replaying_receive,
    request_body,
    request_json,
)
from middleware.errors import BadRequest, PayloadTooLarge
from middleware.types import Message, Receive, Scope

pytestmark = pytest.mark.anyio

DISCONNECT: Message = {"type": "http.disconnect"}


def scope(*headers: tuple[bytes, bytes]) -> Scope:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": list(headers)}


def server(*chunks: bytes) -> tuple[Receive, list[Message]]:
    """A server's receive that delivers ``chunks`` then disconnects; and the list of what it delivered."""
    queue: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
    ]
    delivered: list[Message] = []

    async def receive() -> Message:
        message = queue.pop(0) if queue else DISCONNECT
        delivered.append(message)
        return message

    return receive, delivered


async def test_the_first_reader_reads_the_server_and_stores_one_request_body() -> None:
    s = scope()
    receive, delivered = server(b'{"model":', b'"m"}')
    assert await read_body(s, receive) == b'{"model":"m"}'
    assert await read_body(s, receive) == b'{"model":"m"}'  # the second reader does not touch the server
    assert len(delivered) == 2
    body = s["state"][REQUEST_BODY_KEY]
    assert isinstance(body, RequestBody) and request_body(s) is body
    assert (body.size, body.model) == (13, "m")
    assert request_json(s) is body.json is request_json(s)  # parsed once


async def test_a_limit_smaller_than_a_body_read_earlier_still_applies() -> None:
    s = scope()
    receive, _ = server(b"x" * 100)
    await read_body(s, receive, limit_bytes=1000)
    with pytest.raises(PayloadTooLarge):
        await read_body(s, receive, limit_bytes=10)
    assert await read_body(s, receive) == b"x" * 100  # no limit of its own: what the first reader accepted


async def test_the_replay_gives_the_body_once_then_the_servers_channel() -> None:
    s = scope()
    receive, _ = server(b"{}")
    assert await model_of(s, receive) is None
    replay = replaying_receive(s, receive)
    assert await replay() == {"type": "http.request", "body": b"{}", "more_body": False}
    assert await replay() == DISCONNECT


async def test_content_length_with_transfer_encoding_is_refused_before_reading() -> None:
    s = scope((b"content-length", b"2"), (b"transfer-encoding", b"chunked"))
    receive, delivered = server(b"{}")
    with pytest.raises(BadRequest):
        await read_body(s, receive)
    assert delivered == [] and request_body(s) is None


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1]", b"[" * 100_000])
async def test_a_body_that_is_not_a_json_object_has_no_json(raw: bytes) -> None:
    body = RequestBody(raw, server()[0])
    assert body.json is None and body.model is None
