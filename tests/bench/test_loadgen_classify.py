"""The load generator's HTTP client: it tells a complete stream from one shed honestly and one
silently truncated, and it honours ``connection: close``.

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


def test_the_closed_loop_reconnects_when_the_server_says_connection_close() -> None:
    """hypercorn ends a keep-alive connection after 1,000 requests with ``connection: close``; a
    request sent on it anyway is lost, which once showed up as errors of the proxy under test."""
    from bench.loadgen import parse_args, run

    body = b'{"choices":[]}'
    served = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Every connection answers two requests, the second with `connection: close`; a third request
        # on it (the client ignoring the header) gets no answer, as from a server that closed.
        for n in (1, 2):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            served.append(n)
            close = b"connection: close\r\n" if n == 2 else b""
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s" % (close, len(body), body))
        await reader.read(1 << 16)
        writer.close()

    async def go() -> dict[str, object]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run(parse_args(["requests", "--url", f"http://127.0.0.1:{port}", "--concurrency", "1",
                                         "--requests", "20", "--duration-s", "10", "--warmup-s", "0"]))

    result = asyncio.run(go())
    assert result["errors"] == {} and result["completed"] == 20, result
