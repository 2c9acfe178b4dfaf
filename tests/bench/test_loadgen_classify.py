"""The load generator tells a complete stream from one shed honestly and one silently truncated.

The classification is fed raw HTTP bytes as the socket would deliver them, split at awkward places,
so a marker (`[DONE]`, `event: error`) cut over two reads is still found.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.loadgen import Client, Response, classify

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
FRAME = b'data: {"choices":[{"delta":{"content":"tok "}}]}\n\n'
DONE = b"data: [DONE]\n\n"
# What lmgate sends when it cuts a started stream (middleware.errors.sse_error_frame).
ERROR = b'event: error\ndata: {"error":{"message":"cut","type":"upstream_error","code":"stream_cut"}}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def feed(reads: list[bytes], *, close: bool = False) -> Response:
    """Deliver ``reads`` to a fresh Client one by one; the Response it built."""

    async def go() -> Response:
        client = Client()
        client.transport = None
        client.response = Response(0.0)
        client.future = asyncio.get_running_loop().create_future()
        response = client.response
        for data in reads:
            client.data_received(data)
        if close:
            client.connection_lost(None)
            if client.future.done():
                client.future.exception()
        return response

    return asyncio.run(go())


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


BODY = b"".join(chunk(FRAME) for _ in range(4))


@pytest.mark.parametrize("size", [1, 3, 5, 7, 1000])
def test_every_frame_and_done_is_complete_however_the_reads_split(size: int) -> None:
    response = feed(split_every(HEAD + BODY + chunk(DONE) + b"0\r\n\r\n", size))
    assert response.complete and response.done_seen and not response.error_frame
    assert classify(response, 5) == "complete"


@pytest.mark.parametrize("size", [1, 4, 9, 1000])
def test_an_error_frame_is_found_across_reads(size: int) -> None:
    response = feed(split_every(HEAD + BODY + chunk(ERROR) + b"0\r\n\r\n", size))
    assert response.error_frame and not response.done_seen
    assert classify(response, 5) == "error_frame"


def test_a_stream_that_stops_short_is_truncated() -> None:
    closed = feed([HEAD + BODY], close=True)
    assert classify(closed, 5) == "truncated"
    # All frames but no `data: [DONE]`: still not complete.
    no_done = feed([HEAD + BODY + chunk(FRAME) + b"0\r\n\r\n"])
    assert no_done.complete and classify(no_done, 5) == "truncated"
    assert classify(None, 5) == "truncated"


def test_an_error_status_is_refused() -> None:
    body = b'{"error":{"message":"busy","type":"overloaded","code":"overloaded"}}'
    response = feed([b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)])
    assert response.complete and classify(response, 5) == "refused"
