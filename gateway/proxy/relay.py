"""The terminal ASGI app: a streaming pass-through proxy to one upstream; exchange and relay.

1. Check the route (404 otherwise), read the body once (``middleware.body``), build the upstream
   request: same method, path and query on the configured upstream, filtered headers, and a body
   asking for a stream with usage when lmgate assembles or telemetry counts (``proxy.usage``).
2. Send it with the shared ``httpx.AsyncClient`` in streaming mode, watching for the client to
   leave (``cancel_on_disconnect``: the server's disconnect signal, or a task reading ``receive()``
   for ``http.disconnect``). When the client leaves, at any phase (waiting for
   headers, a model load, mid-stream), the forwarding is cancelled and the upstream response is
   closed in a shielded ``finally``: LM Studio stops generating, the pooled connection is released.
3. Relay: each upstream chunk (raw, content-encoding intact) goes to the client as one
   ASGI message as soon as it arrives; ``await send`` returning is the backpressure. An event
   stream goes out in whole frames only (``FrameHold``), so a cut never leaves half a frame in
   front of the error. An error answer is read whole and normalised (``proxy.error_bodies``); a
   non-streaming answer lmgate asked a stream for is assembled (``proxy.assemble``).
4. The end: a body must end where its framing says (``proxy.body``, ``proxy.transport``); one
   that does not gets an error, never a clean end.

Failures before the response starts are raised as ``LmgateError`` (rendered by the outer
``ErrorMiddleware``, and seen by retry and the breaker); after it started, as ``StreamCut`` (an
SSE error frame, or an aborted transfer for other bodies).
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import httpx

from gateway.proxy.assemble import DEFAULT_ASSEMBLED_LIMIT_BYTES, Assembly, ModelInfo
from gateway.proxy.body import UpstreamBody, check_end, check_stream_end
from gateway.proxy.error_bodies import read_error_answer, send_error_answer
from gateway.proxy.headers import downstream_response_headers, upstream_request_headers
from gateway.proxy.sse import DEFAULT_FRAME_BYTES, FrameHold, StreamMarkers
from gateway.proxy.upstream_errors import translate_transport_error
from gateway.proxy.usage import upstream_body
from gateway.request.routes import (
    RequestKind,
    RouteTable,
    assembled_routes,
    request_kind,
    route_path,
    upstream_target,
)
from gateway.telemetry.stream import UsageTap, usage_tap
from middleware.body import DEFAULT_LIMIT_BYTES, read_body
from middleware.disconnect import cancel_on_disconnect
from middleware.errors import ClientDisconnected, NotFound
from middleware.request_id import request_id
from middleware.response import is_event_stream
from middleware.types import Receive, Scope, Send

# Upstream URLs kept parsed (Proxy._url).
_PARSED_URLS = 256


class Proxy:
    """Forward allowed routes to ``upstream_url`` with ``client``; see the module docstring."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        upstream_url: str,
        routes: RouteTable | None = None,
        api_key: str | None = None,
        forward_client_auth: bool = False,
        assemble_non_streaming: Mapping[str, bool] | bool = True,
        normalise_errors: bool = True,
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        assembled_limit_bytes: int = DEFAULT_ASSEMBLED_LIMIT_BYTES,
        model_info: ModelInfo | None = None,
        frame_limit_bytes: int = DEFAULT_FRAME_BYTES,
    ) -> None:
        self.client = client
        self.timeout = client.timeout.as_dict()
        self.upstream_url = upstream_url.rstrip("/")
        self.routes = routes or RouteTable()
        self.api_key = api_key
        self.forward_client_auth = forward_client_auth
        self.assemble = assembled_routes(assemble_non_streaming)
        self.normalise_errors = normalise_errors
        self.body_limit_bytes = body_limit_bytes
        self.frame_limit_bytes = frame_limit_bytes
        self._urls: dict[str, httpx.URL] = {}
        self.assembly = Assembly(
            client, self.upstream_url, api_key=api_key, model_info=model_info,
            limit_bytes=assembled_limit_bytes, frame_limit_bytes=frame_limit_bytes,
        )

    @property
    def model_info(self) -> ModelInfo:
        """``model_info`` for the ``/api/v0`` answers lmgate assembles."""
        return self.assembly.model_info

    @model_info.setter
    def model_info(self, value: ModelInfo) -> None:  # the gateway points it at its model registry
        self.assembly.model_info = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = route_path(scope)
        if not self.routes.allows(path):
            raise NotFound(f"lmgate does not serve {path!r}; see the list of forwarded routes in docs.")
        body = await read_body(scope, receive, limit_bytes=self.body_limit_bytes)
        kind = request_kind(scope, path, self.assemble)
        tap = usage_tap(scope, path)
        rid = request_id(scope)
        body = upstream_body(scope, body, assembled=kind.assemble is not None, strips_usage=tap is not None and tap.strip)
        request = self._upstream_request(scope, body, rid=rid)

        watch = cancel_on_disconnect(receive, scope=scope)
        completed = False
        try:
            async with watch:
                await self._exchange(request, send, request_id=rid, kind=kind, tap=tap)
                completed = True
        except Exception as exc:
            if watch.disconnected:
                raise ClientDisconnected() from exc  # it failed because the client left
            raise
        # Servers report http.disconnect as soon as a response is complete: only a disconnect
        # before that is a client leaving.
        if watch.disconnected and not completed:
            raise ClientDisconnected()

    def _upstream_request(self, scope: Scope, body: bytes, *, rid: str) -> httpx.Request:
        # A plain Request, not client.build_request(): that would merge the client's cookie jar,
        # which collects every Set-Cookie the upstream sends, into requests from other clients.
        headers = upstream_request_headers(
            scope, request_id=rid, api_key=self.api_key, forward_client_auth=self.forward_client_auth
        )
        return httpx.Request(
            scope["method"], self._url(upstream_target(self.upstream_url, scope)), headers=headers, content=body,
            extensions={"timeout": self.timeout},
        )

    def _url(self, target: str) -> httpx.URL:
        """``target`` parsed, remembered: httpx parses and validates a URL string on every request
        (~11 us), and a gateway sees a handful of paths. Bounded, for clients that vary the query."""
        url = self._urls.get(target)
        if url is None:
            if len(self._urls) >= _PARSED_URLS:
                self._urls.clear()
            url = self._urls[target] = httpx.URL(target)
        return url

    async def _exchange(
        self, request: httpx.Request, send: Send, *, request_id: str, kind: RequestKind, tap: UsageTap | None
    ) -> None:
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, response_started=False) from exc
        try:
            await self._relay(response, send, rid=request_id, kind=kind, tap=tap)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay(
        self, response: httpx.Response, send: Send, *, rid: str, kind: RequestKind, tap: UsageTap | None
    ) -> None:
        """Send the response on: an error body normalised, an answer assembled, or relayed as it comes."""
        body = UpstreamBody(response)
        status = response.status_code
        error = await read_error_answer(
            body, normalise=self.normalise_errors, expects_events=kind.expects_events,
            whole_limit=self.assembly.limit_bytes,
        )
        event_stream = is_event_stream(response.headers.raw)
        if error is not None:
            await send_error_answer(response, error, send, request_id=rid, api_key=self.api_key)
        elif kind.assemble is not None and event_stream and status == 200:
            await self.assembly.relay(response, send, kind=kind.assemble, request_id=rid, tap=tap)
        elif event_stream:
            markers = StreamMarkers() if kind.ends_with_done else None
            await self._relay_events(body, send, request_id=rid, markers=markers, tap=tap if status == 200 else None)
        else:
            await _relay_body(body, send, request_id=rid)

    async def _relay_events(
        self, body: UpstreamBody, send: Send, *, request_id: str, markers: StreamMarkers | None, tap: UsageTap | None
    ) -> None:
        """Send an event stream on as it comes, whole frames only.

        A partial frame is held until its blank line arrives (:class:`FrameHold`). On a cut it is
        dropped, and lmgate's error frame says so, rather than reaching the client in front of that
        error frame as broken JSON. ``tap`` (telemetry) may remove the usage frame it asked for;
        ``markers`` watch for ``[DONE]`` on routes whose streams end with it.
        """
        response = body.response
        headers = downstream_response_headers(response.headers.raw, request_id=request_id, event_stream=True)
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        frames = FrameHold(self.frame_limit_bytes)
        chunk = await body.next(started=True)
        while chunk:
            chunk = frames.feed(chunk)
            if tap is not None:
                chunk = tap.feed(chunk)
            await _send_events(send, chunk, markers)
            chunk = await body.next(started=True, frames=frames)
        if tap is not None:
            await _send_events(send, tap.close(), markers)
        check_stream_end(response, frames, markers)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_events(send: Send, chunk: bytes, markers: StreamMarkers | None) -> None:
    if chunk:
        if markers is not None:
            markers.feed(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _relay_body(body: UpstreamBody, send: Send, *, request_id: str) -> None:
    """Send a body that is not an event stream on, chunk by chunk.

    The start waits for the first chunk, and chunks are counted against the ``Content-Length``:
    a body its own header cuts short (the upstream sent more) fails before its last byte goes
    out, so the client never holds a complete-looking answer: a 502 when the first chunk is
    the last, an aborted transfer otherwise.
    """
    response = body.response
    headers = downstream_response_headers(response.headers.raw, request_id=request_id, event_stream=False)
    start = {"type": "http.response.start", "status": response.status_code, "headers": headers}
    remaining = body.content_length
    checked = started = False
    chunk = await body.next(started=False)
    while chunk:
        if remaining is not None:
            remaining -= len(chunk)
            if remaining <= 0:
                check_end(response)
                checked = True
        if not started:
            await send(start)
            started = True
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        chunk = await body.next(started=True)
    if not checked:
        check_end(response)
    if not started:
        await send(start)
    await send({"type": "http.response.body", "body": b"", "more_body": False})
