"""The terminal ASGI app: a streaming pass-through proxy to one upstream.

Shape of one request:

1. Check the route (404 otherwise), read the body once (``middleware.body``), build the upstream
   request: same method, path and query on the configured upstream, filtered headers.
2. Send it with the shared ``httpx.AsyncClient`` in streaming mode, while a watcher task listens
   to ``receive()`` for ``http.disconnect``. When the client leaves, at any phase (waiting for
   headers, a model load, mid-stream), the watcher cancels the forwarding and the upstream response
   is closed in a shielded ``finally``: LM Studio sees the disconnect and stops generating, and
   the pooled connection is released, not leaked.
3. Relay: each upstream chunk (``aiter_raw``: no decoding, content-encoding intact) is sent to the
   client as one ASGI message as soon as it arrives. ``await send`` returns only when the server
   accepted the bytes, so a slow client slows the reads from the upstream (backpressure). On an
   event stream only whole frames go out: a chunk's trailing partial frame waits for the chunk
   that completes it (``FrameHold``), so a cut never leaves half a frame in front of the error.
4. The end: a response must end where its framing says. Bytes the upstream sent past its
   ``Content-Length`` (or after its last chunk) mean the body was cut by its own header, or the
   connection carries something else: the client gets an error, never a clean end, and the
   connection is closed (``gateway.proxy.transport``). A JSON answer lmgate reads whole (an error, or
   JSON where an event stream was asked for) must parse.

Failures before the response starts are raised as ``LmgateError`` (rendered by the outer
``ErrorMiddleware``, and seen by retry and the breaker); after it started, as ``StreamCut`` (an
SSE error frame, or an aborted transfer for other bodies). LM Studio's own errors keep their
status, and its ``{"error": "text"}`` bodies are normalised to the OpenAI shape.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx

from gateway.proxy.assemble import CompletionAssembler, streaming_request_body
from gateway.proxy.upstream_errors import normalise_error_body, translate_transport_error
from gateway.proxy.headers import downstream_response_headers, upstream_request_headers
from gateway.models.upstream import UpstreamModels
from gateway.request.paths import strip_credentials, wire_path
from gateway.request.routes import ASSEMBLABLE, DONE_TERMINATED, RouteTable, route_path
from gateway.proxy.sse import DEFAULT_FRAME_BYTES, FrameHold, StreamMarkers
from gateway.telemetry.stream import UsageTap, usage_tap
from gateway.proxy.transport import unread_bytes
from gateway.proxy.usage import PromptTokens
from middleware.body import DEFAULT_LIMIT_BYTES, read_body, request_json
from middleware.disconnect import cancel_on_disconnect
from middleware.errors import ClientDisconnected, NotFound, StreamCut, UpstreamProtocolError
from middleware.request_id import request_id
from middleware.response import is_event_stream
from middleware.types import Receive, Scope, Send

#: On an assembled answer whose usage lmgate counted (the upstream streamed none):
#: ``counted``, or ``counted; prompt=estimated`` when the prompt's tokens are an estimate.
USAGE_HEADER = b"x-lmgate-usage"
#: The ``model_info`` of a model, for ``/api/v0`` answers lmgate assembles (None: unknown).
ModelInfo = Callable[[str], Awaitable[Mapping[str, Any] | None]]

# Error bodies are small; anything larger is passed through untouched rather than buffered.
_MAX_ERROR_BODY = 64 * 1024
DEFAULT_ASSEMBLED_LIMIT_BYTES = 64 * 1024 * 1024


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
        if isinstance(assemble_non_streaming, bool):
            self.assemble = {path: kind for path, kind in ASSEMBLABLE.items() if assemble_non_streaming}
        else:
            self.assemble = {
                path: kind for path, kind in ASSEMBLABLE.items() if assemble_non_streaming.get(path, True)
            }
        self.normalise_errors = normalise_errors
        self.body_limit_bytes = body_limit_bytes
        self.assembled_limit_bytes = assembled_limit_bytes
        # For assembled answers: the prompt's tokens when the upstream streams no usage, and the
        # model_info of /api/v0 answers (the gateway points this at its model registry).
        self.prompt_tokens = PromptTokens(client, self.upstream_url)
        self.model_info: ModelInfo = model_info or _describe_with(UpstreamModels(client, upstream_url, api_key=api_key))
        self.frame_limit_bytes = frame_limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = route_path(scope)
        if not self.routes.allows(path):
            raise NotFound(f"lmgate does not serve {path!r}; see the list of forwarded routes in docs.")
        body = await read_body(scope, receive, limit_bytes=self.body_limit_bytes)
        assemble_kind = self._assembly_kind(scope, path)
        # The upstream is asked for an event stream (by the client, or by lmgate to assemble one).
        expects_events = assemble_kind is not None or (request_json(scope) or {}).get("stream") is True
        tap = usage_tap(scope, path)
        if assemble_kind is not None or (tap is not None and tap.strip):
            # Assembly needs a stream; telemetry needs the usage the client did not ask for.
            body = streaming_request_body(request_json(scope) or {})
        rid = request_id(scope)
        # A plain Request, not client.build_request(): that would merge the client's cookie jar,
        # which collects every Set-Cookie the upstream sends, into requests from other clients.
        request = httpx.Request(
            scope["method"],
            self._upstream_url(scope),
            headers=upstream_request_headers(
                scope, request_id=rid, api_key=self.api_key, forward_client_auth=self.forward_client_auth
            ),
            content=body,
            extensions={"timeout": self.timeout},
        )

        watch = cancel_on_disconnect(receive)
        completed = False
        try:
            async with watch:
                await self._exchange(
                    request, send, path=path, request_id=rid, assemble_kind=assemble_kind, tap=tap,
                    expects_events=expects_events,
                )
                completed = True
        except Exception as exc:
            if watch.disconnected:
                raise ClientDisconnected() from exc  # it failed because the client left
            raise
        # Servers report http.disconnect as soon as a response is complete: only a disconnect
        # before that is a client leaving.
        if watch.disconnected and not completed:
            raise ClientDisconnected()

    def _assembly_kind(self, scope: Scope, path: str) -> str | None:
        kind = self.assemble.get(path)
        if kind is None or scope["method"] != "POST":
            return None
        document = request_json(scope)
        if document is None or document.get("stream"):
            return None
        return kind

    def _upstream_url(self, scope: Scope) -> str:
        # Built from the very path the route check and every other decision read (canonical:
        # gateway.request.paths), never from the client's raw_path; credentials never leave in the query.
        url = self.upstream_url + wire_path(route_path(scope)).decode("ascii")
        query = strip_credentials(scope.get("query_string", b""))
        return f"{url}?{query.decode('latin-1')}" if query else url

    async def _exchange(
        self,
        request: httpx.Request,
        send: Send,
        *,
        path: str,
        request_id: str,
        assemble_kind: str | None,
        tap: UsageTap | None = None,
        expects_events: bool = False,
    ) -> None:
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, response_started=False) from exc
        try:
            status = response.status_code
            event_stream = is_event_stream(response.headers.raw)
            chunks = response.aiter_raw()
            head = b""
            if self.normalise_errors and status >= 400:
                # Errors are small JSON documents: read one whole to normalise it.
                head, complete = await _read_up_to(chunks, head, limit=_MAX_ERROR_BODY)
                if complete:
                    _check_end(response)
                    await self._send_error_body(response, head, send, request_id=request_id)
                    return
            elif status < 400 and not event_stream and _is_json(response):
                # LM Studio even answers unknown routes with 200 {"error": ...}: peek at a 200.
                head = await _next_chunk(chunks, started=False)
                is_error = self.normalise_errors and head.startswith(b'{"error"')
                if is_error or (expects_events and status == 200):
                    # Read whole: an error to normalise, or JSON where an event stream was asked
                    # for (an SDK finds no event in it, cut or not, and says nothing).
                    limit = _MAX_ERROR_BODY if is_error else self.assembled_limit_bytes
                    head, complete = await _read_up_to(chunks, head, limit=limit)
                    if complete:
                        _check_end(response)
                        _check_json(head, status)
                        if is_error:
                            await self._send_error_body(response, head, send, request_id=request_id)
                            return
            if assemble_kind is not None and event_stream and status == 200:
                await self._relay_assembled(response, send, kind=assemble_kind, request_id=request_id, tap=tap)
            elif event_stream:
                await self._relay_events(
                    response, chunks, send, head=head, path=path, request_id=request_id,
                    tap=tap if status == 200 else None,
                )
            else:
                await self._relay_body(response, chunks, send, head=head, request_id=request_id)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay_events(
        self,
        response: httpx.Response,
        chunks: AsyncIterator[bytes],
        send: Send,
        *,
        head: bytes,
        path: str,
        request_id: str,
        tap: UsageTap | None = None,
    ) -> None:
        """Send an event stream on as it comes, whole frames only; ``head``: bytes already read.

        A partial frame is held until its blank line arrives (:class:`FrameHold`). On a cut it is
        dropped, and lmgate's error frame says so, rather than reaching the client in front of that
        error frame as broken JSON. ``tap`` (telemetry) may remove the usage frame it asked for.
        """
        headers = downstream_response_headers(response.headers.raw, request_id=request_id, event_stream=True)
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        frames = FrameHold(self.frame_limit_bytes)
        markers = StreamMarkers() if path in DONE_TERMINATED else None
        chunk = head or await _next_chunk(chunks, started=True)
        while chunk:
            chunk = frames.feed(chunk)
            if tap is not None:
                chunk = tap.feed(chunk)
            if chunk:
                if markers is not None:
                    markers.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            chunk = await _next_chunk(chunks, started=True, frames=frames)
        if tap is not None and (rest := tap.close()):
            if markers is not None:
                markers.feed(rest)
            await send({"type": "http.response.body", "body": rest, "more_body": True})
        # The stream ended where the upstream's framing says: was the answer complete?
        if markers is None or not (markers.done or markers.error):
            if frames.pending:
                without_done = " without `data: [DONE]`" if markers is not None else ""
                raise StreamCut(f"The upstream ended the stream inside a frame{without_done}. {_dropped(frames.pending)}")
            if markers is not None:
                raise StreamCut("The upstream ended the stream without `data: [DONE]`; the answer is incomplete.")
            _check_end(response, cut=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay_body(
        self, response: httpx.Response, chunks: AsyncIterator[bytes], send: Send, *, head: bytes, request_id: str
    ) -> None:
        """Send a body that is not an event stream on, chunk by chunk; ``head``: bytes already read.

        The start waits for the first chunk, and chunks are counted against the ``Content-Length``:
        a body its own header cuts short (the upstream sent more) fails before its last byte goes
        out, so the client never holds a complete-looking answer: a 502 when the first chunk is
        the last, an aborted transfer otherwise.
        """
        headers = downstream_response_headers(response.headers.raw, request_id=request_id, event_stream=False)
        remaining = _content_length(response)
        checked = started = False
        chunk = head or await _next_chunk(chunks, started=False)
        while chunk:
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    _check_end(response)
                    checked = True
            if not started:
                await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
                started = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            chunk = await _next_chunk(chunks, started=True)
        if not checked:
            _check_end(response)
        if not started:
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_error_body(self, response: httpx.Response, body: bytes, send: Send, *, request_id: str) -> None:
        """Send a complete upstream error body, normalised to the OpenAI shape when it is one."""
        status = response.status_code
        if self.api_key and self.api_key.encode() in body:  # an upstream quoting lmgate's token back
            body = body.replace(self.api_key.encode(), b"[redacted]")
        headers = downstream_response_headers(response.headers.raw, request_id=request_id, event_stream=False)
        headers = [(k, v) for k, v in headers if k not in (b"content-length", b"content-encoding")]
        normalised = normalise_error_body(body, status) if not response.headers.get("content-encoding") else None
        if normalised is not None:
            body, code = normalised
            if status < 400:
                # Only "Unexpected endpoint or method" arrives as an error with status 200.
                status = 404 if code == "not_found" else 502
            headers.append((b"x-lmgate-error", code.encode("latin-1")))
        elif response.headers.get("content-encoding"):
            headers.append((b"content-encoding", response.headers["content-encoding"].encode("latin-1")))
        headers.append((b"content-length", str(len(body)).encode("ascii")))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _relay_assembled(
        self, response: httpx.Response, send: Send, *, kind: str, request_id: str, tap: UsageTap | None = None
    ) -> None:
        # created as the headers arrive: it times the stream
        assembler = CompletionAssembler(kind, max_frame_bytes=self.frame_limit_bytes)
        try:
            async for text in response.aiter_text():
                if response.num_bytes_downloaded > self.assembled_limit_bytes:
                    # The answer is held in memory whole: an upstream gone wild must not exhaust it.
                    raise UpstreamProtocolError(
                        f"The upstream's answer is larger than limits.assembled_bytes ({self.assembled_limit_bytes} "
                        "bytes); ask for a stream to receive it."
                    )
                assembler.feed(text)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, response_started=False) from exc
        assembler.close()
        # The request as sent is parsed again only when needed (a prompt may be megabytes long).
        request = _sent_document(response.request) if assembler.usage_missing or not assembler.model else {}
        model = assembler.model or _string(request.get("model"))
        prompt_tokens, prompt_source = None, None
        if assembler.usage_missing:  # an engine that ignores stream_options.include_usage
            auth = response.request.headers.get("authorization")
            prompt_tokens, prompt_source = await self.prompt_tokens.count(
                request, model=model, headers={"authorization": auth} if auth else None
            )
        model_info = await self.model_info(model) if assembler.lmstudio_v0 and model else None
        document = assembler.result(prompt_tokens=prompt_tokens, model_info=model_info)
        counted = {"input": prompt_source, "output": "counted"} if prompt_source is not None else None
        if tap is not None:
            tap.record.note_usage(document.get("usage"), document, counted=counted)
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        upstream = downstream_response_headers(response.headers.raw, request_id=request_id, event_stream=False)
        headers = [
            (k, v) for k, v in upstream if k not in (b"content-type", b"content-length", b"content-encoding", b"cache-control")
        ]
        headers += [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if prompt_source is not None:
            headers.append((USAGE_HEADER, b"counted" if prompt_source == "counted" else b"counted; prompt=estimated"))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _sent_document(request: httpx.Request) -> dict[str, Any]:
    """The JSON body lmgate sent upstream (the client's request, asking for a stream)."""
    try:
        document = json.loads(request.content)
    except (ValueError, UnicodeDecodeError):
        return {}
    return document if isinstance(document, dict) else {}


def _string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _describe_with(upstream: UpstreamModels) -> ModelInfo:
    """``model_info`` straight from ``GET /api/v0/models/{model}`` (a proxy without a registry)."""

    async def model_info(model: str) -> Mapping[str, Any] | None:
        facts = await upstream.model_facts(model)
        return (facts.model_info() or None) if facts is not None else None

    return model_info


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("application/json")


async def _next_chunk(chunks: AsyncIterator[bytes], *, started: bool, frames: FrameHold | None = None) -> bytes:
    """The next raw chunk, b"" at the end; transport failures translated for the current phase.

    ``frames``: the event stream's hold, whose partial frame a cut drops (the error says so).
    """
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return b""
    except httpx.HTTPError as exc:
        error = translate_transport_error(exc, response_started=started)
        if frames is not None and frames.pending:
            error = StreamCut(f"{error.message} {_dropped(frames.pending)}")
        raise error from exc


def _dropped(held: int) -> str:
    return f"Its last frame arrived only in part; those {held} bytes were dropped, not sent."


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _check_end(response: httpx.Response, *, cut: bool = False) -> None:
    """Raise if the upstream sent bytes past the end its framing declared for ``response``.

    Call once the body reached that end. A ``Content-Length`` shorter than the body sent means the
    answer was cut by its own header. ``cut``: the response has started as an event stream.
    """
    extra = unread_bytes(response)
    if not extra:
        return
    declared = response.headers.get("content-length")
    framing = f"its Content-Length ({declared} bytes)" if declared is not None else "its framing"
    message = (
        f"The upstream's answer (HTTP {response.status_code}) is cut: {extra} more bytes came after the end "
        f"{framing} declared."
    )
    raise StreamCut(message) if cut else UpstreamProtocolError(message)


def _check_json(body: bytes, status: int) -> None:
    """Raise if a JSON answer lmgate read whole does not parse: it was cut, or is not JSON."""
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpstreamProtocolError(
            f"The upstream's JSON answer (HTTP {status}, {len(body)} bytes) does not parse; it is incomplete "
            f"or not JSON: {exc}"
        ) from exc


async def _read_up_to(chunks: AsyncIterator[bytes], head: bytes, *, limit: int) -> tuple[bytes, bool]:
    """Read on until the end or past ``limit`` bytes; returns what was read and whether it ended."""
    parts = [head]
    size = len(head)
    while size <= limit:
        chunk = await _next_chunk(chunks, started=False)
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), False
