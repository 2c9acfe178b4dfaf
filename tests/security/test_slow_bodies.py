"""Request bodies that never arrive, or trickle, over raw sockets to a real lmgate: each ends with
408 ``request_timeout`` and a closed connection instead of holding it for ever."""

from __future__ import annotations

import json

import anyio
import anyio.abc
import pytest

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"


def head(path: str, *lines: str) -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: lmgate", "Content-Type: application/json", *lines, "", ""]).encode()


async def answer(stream: anyio.abc.SocketStream) -> tuple[bytes, dict]:
    """Everything the server sends until it closes the connection: (head, JSON body)."""
    received = b""
    with anyio.fail_after(10):  # generous; the deadlines under test are at most a second
        try:
            while True:
                received += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    status_and_headers, _, body = received.partition(b"\r\n\r\n")
    return status_and_headers.lower(), json.loads(body)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("path", [CHAT, "/v1/embeddings"])
async def test_headers_then_silence_is_408_after_the_idle_deadline(sim, start_gateway, path):
    # Before: the connection, and the telemetry layer reading the body, waited for ever.
    async with (
        start_gateway(sim.url, limits={"body_idle_s": 0.5, "body_total_s": 30}) as gw,
        await anyio.connect_tcp("127.0.0.1", port_of(gw.url)) as stream,
    ):
        started = anyio.current_time()
        await stream.send(head(path, "Content-Length: 100"))
        status, body = await answer(stream)
        waited = anyio.current_time() - started
    assert status.startswith(b"http/1.1 408") and b"connection: close" in status
    assert body["error"]["code"] == "request_timeout" and body["error"]["type"] == "invalid_request_error"
    assert "nothing for 0.5 s" in body["error"]["message"]
    assert waited >= 0.5
    assert sim.counters.requests == 0


async def test_a_body_at_a_byte_every_200_ms_is_408_after_the_total_deadline(sim, start_gateway):
    # Each byte comes well within the idle deadline; only the total deadline ends it.
    async with (
        start_gateway(sim.url, limits={"body_idle_s": 0.5, "body_total_s": 1.0}) as gw,
        await anyio.connect_tcp("127.0.0.1", port_of(gw.url)) as stream,
    ):
        started = anyio.current_time()
        await stream.send(head(CHAT, "Content-Length: 100"))
        async with anyio.create_task_group() as tg:

            async def trickle() -> None:
                try:
                    for _ in range(100):
                        await stream.send(b" ")
                        await anyio.sleep(0.2)  # the client's pace, not synchronisation
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass

            tg.start_soon(trickle)
            status, body = await answer(stream)
            waited = anyio.current_time() - started
            tg.cancel_scope.cancel()
    assert status.startswith(b"http/1.1 408") and b"connection: close" in status
    assert body["error"]["code"] == "request_timeout"
    assert "within 1 s" in body["error"]["message"]
    assert waited >= 1.0
    assert sim.counters.requests == 0


async def test_conflicting_content_length_and_transfer_encoding_is_400_at_once_without_a_body(
    sim, start_gateway
):
    # The conflict is refused before anything reads the body: with deadlines of a minute, an
    # answer within the 10 s of `answer` shows nobody waited for a body that is not coming.
    async with (
        start_gateway(sim.url, limits={"body_idle_s": 60, "body_total_s": 60}) as gw,
        await anyio.connect_tcp("127.0.0.1", port_of(gw.url)) as stream,
    ):
        await stream.send(head(CHAT, "Content-Length: 5", "Transfer-Encoding: chunked"))
        status, body = await answer(stream)
    assert status.startswith(b"http/1.1 400") and b"connection: close" in status
    assert body["error"]["code"] == "bad_request" and "Transfer-Encoding" in body["error"]["message"]
    assert sim.counters.requests == 0


async def test_a_declared_oversized_body_that_stalls_is_still_413(sim, start_gateway):
    # lmgate reads and drops a refused body before answering 413 (so the client sees it); a body
    # that stops coming ends that wait at the idle deadline, and the answer is still the 413.
    async with (
        start_gateway(sim.url, limits={"body_bytes": 1024, "body_idle_s": 0.5}) as gw,
        await anyio.connect_tcp("127.0.0.1", port_of(gw.url)) as stream,
    ):
        await stream.send(head(CHAT, "Content-Length: 4096") + b"{")
        status, body = await answer(stream)
    assert status.startswith(b"http/1.1 413")
    assert body["error"]["code"] == "payload_too_large"
