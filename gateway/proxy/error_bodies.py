"""The upstream's error answers: found, read whole, redacted and normalised to the OpenAI shape.

LM Studio reports failures as ``{"error": "text"}`` (OpenAI clients expect ``{"error":
{"message", "type", "code"}}``), and answers even an unknown route with a 200 ``{"error": ...}``.
So lmgate reads a small error answer whole before anything goes to the client:

* an answer with status >= 400 (up to :data:`MAX_ERROR_BODY`; a larger one is relayed untouched);
* a 200 JSON answer that starts with ``{"error"``; it becomes a 404 or a 502;
* a 200 JSON answer where an event stream was asked for, though not an error: it is read whole
  (up to the assembled limit) and must parse, because an SDK finds no event in it and cannot tell
  a cut one from a whole one. It is then relayed as it came.

Before the body is sent, lmgate's own upstream token is redacted from it (an upstream that quotes
the request's ``Authorization`` back), and the error gets an ``x-lmgate-error`` header naming its
code.
"""

from __future__ import annotations

import httpx

from gateway.proxy.body import UpstreamBody, check_end, check_json
from gateway.proxy.headers import downstream_response_headers
from gateway.proxy.upstream_errors import normalise_error_body
from middleware.response import is_event_stream
from middleware.types import Send

#: Error bodies are small; a larger one is relayed untouched rather than buffered.
MAX_ERROR_BODY = 64 * 1024
REDACTED = b"[redacted]"


async def read_error_answer(
    body: UpstreamBody, *, normalise: bool, expects_events: bool, whole_limit: int
) -> bytes | None:
    """The upstream's whole error body when it is one to normalise, else None.

    Whatever was read ahead is put back into ``body`` for the relay. ``normalise``: normalising
    errors is on. ``expects_events``: the upstream was asked for an event stream, so a 200 JSON
    answer is read whole (up to ``whole_limit``) and must parse.
    """
    response = body.response
    status = response.status_code
    head = b""
    if normalise and status >= 400:
        head, complete = await body.read_up_to(head, limit=MAX_ERROR_BODY)
        if complete:
            check_end(response)
            return head
    elif status < 400 and not is_event_stream(response.headers.raw) and _is_json(response):
        head = await body.next(started=False)
        is_error = normalise and head.startswith(b'{"error"')
        if is_error or (expects_events and status == 200):
            head, complete = await body.read_up_to(head, limit=MAX_ERROR_BODY if is_error else whole_limit)
            if complete:
                check_end(response)
                check_json(head, status)
                if is_error:
                    return head
    body.put_back(head)
    return None


async def send_error_answer(
    response: httpx.Response, body: bytes, send: Send, *, request_id: str, api_key: str | None
) -> None:
    """Send a complete upstream error body, redacted, normalised to the OpenAI shape when it is one."""
    status = response.status_code
    body = redact(body, api_key)
    encoding = response.headers.get("content-encoding")
    headers = downstream_response_headers(response.headers.raw, request_id=request_id, event_stream=False)
    headers = [(k, v) for k, v in headers if k not in (b"content-length", b"content-encoding")]
    normalised = normalise_error_body(body, status) if not encoding else None
    if normalised is not None:
        body, code = normalised
        if status < 400:
            # Only "Unexpected endpoint or method" arrives as an error with status 200.
            status = 404 if code == "not_found" else 502
        headers.append((b"x-lmgate-error", code.encode("latin-1")))
    elif encoding:
        headers.append((b"content-encoding", encoding.encode("latin-1")))
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def redact(body: bytes, api_key: str | None) -> bytes:
    """``body`` without lmgate's upstream token (an upstream quoting it back)."""
    if api_key and api_key.encode() in body:
        return body.replace(api_key.encode(), REDACTED)
    return body


def _is_json(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("application/json")
