"""The upstream client's transport (gateway/proxy/transport.py): a connection whose response did not end
where its framing says is closed, never reused for another request. Over real sockets, with a raw
upstream that over-sends (tests/conftest.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.app import make_upstream_client
from gateway.config.settings import Config
from gateway.proxy.aiohttp_transport import AiohttpTransport
from gateway.proxy.transport import FramingGuard, unread_bytes

pytestmark = pytest.mark.anyio

SMUGGLED = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"smuggled\":true}"


@pytest.fixture(params=["httpx", "aiohttp"])
def transport(request: pytest.FixtureRequest) -> str:
    """Both of lmgate's upstream transports (``upstream.transport``) must hold the guard."""
    return str(request.param)


def client_for(url: str, transport: str):
    return make_upstream_client(Config.model_validate({"upstream": {"url": url, "transport": transport}}))


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda raw: raw.response(b'{"first":1}') + SMUGGLED, id="a-second-response-in-the-same-write"),
        pytest.param(lambda raw: raw.response(b'{"first":1}', content_length=5), id="more-than-content-length"),
        pytest.param(
            lambda raw: raw.chunked_head(b"application/json") + raw.chunk(b'{"first":1}') + raw.LAST_CHUNK + SMUGGLED,
            id="bytes-after-the-last-chunk",
        ),
    ],
)
async def test_a_connection_the_upstream_over_sent_on_is_never_reused(raw_upstream, first, transport):
    async def answer(request, writer: asyncio.StreamWriter) -> None:
        if len(raw_upstream.requests) == 1:
            writer.write(first(raw_upstream))
        else:
            writer.write(raw_upstream.response(b'{"second":2}'))

    raw_upstream.answer = answer
    async with client_for(raw_upstream.url, transport) as client:
        one = await client.get(raw_upstream.url + "/v1/models")
        assert one.status_code == 200
        two = await client.get(raw_upstream.url + "/v1/models")
    assert two.status_code == 200 and two.content == b'{"second":2}'
    assert [r.connection for r in raw_upstream.requests] == [1, 2]


async def test_a_clean_connection_is_still_reused_and_reports_nothing_unread(raw_upstream, transport):
    async def answer(request, writer: asyncio.StreamWriter) -> None:
        writer.write(raw_upstream.response(b'{"ok":true}'))

    raw_upstream.answer = answer
    async with client_for(raw_upstream.url, transport) as client:
        assert isinstance(client._transport, AiohttpTransport if transport == "aiohttp" else FramingGuard)
        for _ in range(3):
            response = await client.get(raw_upstream.url + "/v1/models")
            assert response.content == b'{"ok":true}' and unread_bytes(response) == 0
    assert [r.connection for r in raw_upstream.requests] == [1, 1, 1]


async def test_unread_bytes_tells_a_body_cut_by_its_content_length(raw_upstream, transport):
    async def answer(request, writer: asyncio.StreamWriter) -> None:
        writer.write(raw_upstream.response(b'{"content":"the whole answer"}', content_length=12))

    raw_upstream.answer = answer
    async with client_for(raw_upstream.url, transport) as client:
        response = await client.get(raw_upstream.url + "/v1/models")
    assert response.content == b'{"content":"' and unread_bytes(response) == len(b'the whole answer"}')
