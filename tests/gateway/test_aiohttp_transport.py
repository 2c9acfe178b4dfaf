"""lmgate's upstream transport, httpx's API over aiohttp's I/O (gateway/proxy/aiohttp_transport.py):
over real sockets, against a raw upstream, it fails as httpx's own transport does (the same
exception types, the wording lmgate reads), times out by httpx's timeouts, bounds its pool, hands
over bytes as they arrive, drops a connection whose response was left unfinished and lets idle
connections expire as httpx's pool does."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from gateway.app import make_upstream_client
from gateway.config.settings import Config
from gateway.proxy.aiohttp_transport import AiohttpTransport
from gateway.proxy.upstream_errors import translate_transport_error
from middleware.errors import UpstreamProtocolError, UpstreamUnavailable

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[str]:
    """A one-handler server on 127.0.0.1: the handler reads the request itself and writes anything."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def client(url: str, transport: str = "aiohttp", **config: object) -> httpx.AsyncClient:
    return make_upstream_client(Config.model_validate({"upstream": {"url": url, "transport": transport}, **config}))


def answering(data: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(data)
        await writer.drain()

    return handler


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"

FAILURES = [
    pytest.param(b"", httpx.RemoteProtocolError, UpstreamUnavailable, id="closed-before-the-response"),
    pytest.param(HEAD + b"content-length: 50\r\n\r\n{\"a\":", httpx.RemoteProtocolError, UpstreamUnavailable,
                 id="closed-inside-a-content-length-body"),
    pytest.param(HEAD + b"transfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n", httpx.RemoteProtocolError,
                 UpstreamUnavailable, id="closed-inside-a-chunked-body"),
    pytest.param(b"HTTP/1.1 2x0 nope\r\n\r\n", httpx.RemoteProtocolError, UpstreamProtocolError,
                 id="malformed-status-line"),
    pytest.param(b"hello there\r\n\r\n", httpx.RemoteProtocolError, UpstreamProtocolError, id="not-http"),
    pytest.param(HEAD + b"transfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\nzz\r\n", httpx.RemoteProtocolError,
                 UpstreamProtocolError, id="malformed-chunk-header"),
]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize(("sent", "raised", "translated"), FAILURES)
async def test_a_broken_upstream_fails_as_with_httpxs_own_transport(transport, sent, raised, translated):
    async with upstream(answering(sent)) as url, client(url, transport) as upstream_client:
        with pytest.raises(httpx.HTTPError) as caught:
            await upstream_client.get(url + "/v1/models")
    assert type(caught.value) is raised
    # What lmgate makes of it: the peer leaving is retried (unavailable), a malformed answer is not.
    assert type(translate_transport_error(caught.value, response_started=False)) is translated


async def test_a_refused_connection_is_a_connect_error():
    async with upstream(answering(b"")) as url:
        pass  # closed: nothing listens on its port any more
    async with client(url) as upstream_client:
        with pytest.raises(httpx.ConnectError):
            await upstream_client.get(url + "/v1/models")


@pytest.mark.parametrize("where", ["before-the-head", "inside-the-body"])
async def test_a_silent_upstream_is_a_read_timeout(where):
    silence = asyncio.Event()  # never set: the upstream just stops

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if where == "inside-the-body":
            writer.write(HEAD + b"content-length: 50\r\n\r\n{\"a\":")
            await writer.drain()
        await silence.wait()

    async with upstream(handler) as url, client(url) as upstream_client:
        with pytest.raises(httpx.ReadTimeout):
            await upstream_client.get(url + "/v1/models", timeout=httpx.Timeout(5.0, read=0.2))


async def test_a_full_pool_is_a_pool_timeout_not_a_connect_timeout():
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n")
        await writer.drain()
        await release.wait()

    async with upstream(handler) as url:
        config = {"upstream": {"url": url, "pool": {"max_connections": 1}}, "concurrency": {"enabled": False}}
        async with make_upstream_client(Config.model_validate(config)) as upstream_client:
            held = await upstream_client.send(upstream_client.build_request("GET", url + "/a"), stream=True)
            with pytest.raises(httpx.PoolTimeout):
                await upstream_client.get(url + "/b", timeout=httpx.Timeout(5.0, pool=0.1))
            await held.aclose()
            release.set()


async def test_chunks_reach_the_reader_as_they_arrive_and_encoded_bytes_stay_encoded():
    compressed = gzip.compress(b'{"a":1}')
    read = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n" % 5 + compressed[:5] + b"\r\n")
        await writer.drain()
        await read.wait()  # the next chunk only once the client has the first: nothing waits to batch
        rest = compressed[5:]
        writer.write(b"%x\r\n" % len(rest) + rest + b"\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    chunks = []
    async with (
        upstream(handler) as url,
        client(url) as upstream_client,
        upstream_client.stream("GET", url + "/v1/models") as response,
    ):
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            read.set()
    assert chunks == [compressed[:5], compressed[5:]]


async def test_closing_an_unfinished_response_closes_its_connection_at_once():
    seen_close = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n")
        await writer.drain()
        if await reader.read() == b"":  # EOF: lmgate let go of the connection
            seen_close.set()

    async with upstream(handler) as url, client(url) as upstream_client:
        async with upstream_client.stream("GET", url + "/v1/models") as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(seen_close.wait(), 5)
        assert isinstance(upstream_client._transport, AiohttpTransport)
        assert upstream_client._transport.connections_in_use() == 0


async def test_no_cookie_jar_and_httpxs_headers_only():
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(HEAD + b"set-cookie: session=theirs\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()

    async with upstream(handler) as url, client(url) as upstream_client:
        for _ in range(2):
            await upstream_client.send(httpx.Request("GET", url + "/v1/models", headers={"user-agent": "lmgate"}))
    assert all(b"cookie" not in head.lower().replace(b"set-cookie", b"") for head in heads)
    names = [line.split(b":")[0].lower() for line in heads[1].split(b"\r\n")[1:] if line]
    assert names == [b"host", b"user-agent"]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_trickle_of_requests_keeps_one_idle_connection_and_the_others_expire(transport):
    # aiohttp hands out the connection idle longest: requests every 50 ms took the two idle
    # connections in turn, so neither was ever idle for the 0.3 s expiry and both stayed open for good
    # (the soak test's quiet lmgate, polled, held two connections to the simulator where httpx held one).
    finish = asyncio.Event()
    served: list[int] = []  # the connection (in the order opened) each request came on
    closed: list[int] = []
    one_closed = asyncio.Event()
    opened = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        number, opened = opened, opened + 1
        for _ in range(1000):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # lmgate closed the connection
                closed.append(number)
                one_closed.set()
                return
            served.append(number)
            if head.startswith(b"GET /hold"):  # held open until both requests are under way
                writer.write(HEAD + b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n")
                await writer.drain()
                await finish.wait()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(HEAD + b"content-length: 2\r\n\r\n{}")
            await writer.drain()

    async with upstream(handler) as url:
        config = {"upstream": {"url": url, "transport": transport, "pool": {"keepalive_expiry_s": 0.3}}}
        async with make_upstream_client(Config.model_validate(config)) as upstream_client:
            held = [await upstream_client.send(upstream_client.build_request("GET", url + "/hold"), stream=True)
                    for _ in range(2)]
            finish.set()
            for response in held:
                await response.aread()
                await response.aclose()
            assert opened == 2  # two idle connections
            for _ in range(200):  # a request every 50 ms, until one connection closes (or 10 s)
                await upstream_client.get(url + "/v1/models")
                with anyio.move_on_after(0.05):  # the request rate, not a synchronisation
                    await one_closed.wait()
                if one_closed.is_set():
                    break
            assert len(closed) == 1, f"no idle connection expired: requests came on {served}"
            assert opened == 2
            await upstream_client.get(url + "/v1/models")  # the trickle goes on on the other
            assert served[-1] != closed[0]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_burst_leaves_at_most_max_keepalive_connections_open(transport):
    # httpx.Limits.max_keepalive_connections has no aiohttp setting: without lmgate's connector a
    # burst of n concurrent requests left n idle connections to the upstream until their expiry
    # (200 after the benchmark's cancel storm, with 128 allowed).
    finish = asyncio.Event()
    opened = closed = 0
    all_open, three_closed = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened, closed
        opened += 1
        if opened == 5:
            all_open.set()
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # lmgate closed the connection
                closed += 1
                if closed == 3:
                    three_closed.set()
                return
            await finish.wait()
            writer.write(HEAD + b"content-length: 2\r\n\r\n{}")
            await writer.drain()

    async with upstream(handler) as url:
        config = {"upstream": {"url": url, "transport": transport, "pool": {"max_keepalive_connections": 2}}}
        async with make_upstream_client(Config.model_validate(config)) as upstream_client:
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(upstream_client.get, url + "/v1/models")
                with anyio.fail_after(5):
                    await all_open.wait()
                finish.set()
            with anyio.fail_after(5):
                await three_closed.wait()  # 5 opened, 2 kept
            assert (opened, closed) == (5, 3)
