"""What lmgate refuses before any layer contacts the upstream.

``RequestValidation`` sits right inside telemetry, before drain, cold starts, the queue and the
proxy, so a request the upstream cannot serve costs it nothing: no model load, no slot, no
retry, no breaker sample. Each refusal is a 4xx in the OpenAI error shape with ``param`` set:

| request                                                  | status | code                          |
|----------------------------------------------------------|--------|-------------------------------|
| path and query longer than ``limits.url_bytes``          | 414    | `uri_too_long`                |
| header block larger than ``limits.header_bytes``         | 431    | `headers_too_large`           |
| both ``Content-Length`` and ``Transfer-Encoding``        | 400    | `bad_request` (+ close)       |
| path or query not valid UTF-8 once percent-decoded       | 400    | `bad_request`                 |
| a path outside the forwarded routes                      | 404    | `not_found`                   |
| a known route with the wrong method                      | 405    | `method_not_allowed`          |
| a model route with a non-JSON ``Content-Type``           | 415    | `unsupported_media_type`      |
| body over ``limits.body_bytes``                          | 413    | `payload_too_large`           |
| body not UTF-8, not JSON, or not a JSON object           | 400    | `bad_request`                 |
| ``model`` missing or empty                               | 400    | `missing_required_parameter`  |
| ``model`` not a string, ``stream`` not a boolean         | 400    | `invalid_type`                |
| ``stream_options`` not an object                         | 400    | `invalid_type`                |

``stream_options`` is checked because lmgate writes into it: it asks the upstream for usage when
it assembles a non-streaming answer or counts a stream's tokens. What is *not* checked here:
whether the model exists (the upstream's listing is the authority; LM Studio answers
``400 model_not_found``, normalised by the proxy) and the rest of the body's schema (LM Studio's
own 400s are passed on). A request without ``Content-Type`` is accepted when its body is JSON, as
LM Studio does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from gateway.request.routes import INFERENCE_PATHS, RouteTable, route_path, route_raw_path
from middleware.body import DEFAULT_LIMIT_BYTES, read_body, replaying_receive
from middleware.errors import ClientError
from middleware.types import ASGIApp, Receive, Scope, Send

__all__ = ["InvalidRequest", "RequestValidation", "check_body"]

#: The methods of LM Studio's fixed routes (OPTIONS, the CORS preflight, is always passed on).
_METHODS = {
    **{path: frozenset({"POST"}) for path in INFERENCE_PATHS},
    "/v1/models": frozenset({"GET", "HEAD"}),
    "/lmstudio-greeting": frozenset({"GET", "HEAD"}),
}


class InvalidRequest(ClientError):
    """A request refused by validation; ``param`` names the offending field, as OpenAI does."""

    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str = "bad_request",
        param: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message, headers=headers)
        self.status = status
        self.code = code
        self.param = param

    def to_dict(self) -> dict[str, dict[str, object]]:
        document = super().to_dict()
        document["error"]["param"] = self.param
        return document


class RequestValidation:
    """Refuse what the upstream cannot serve; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: RouteTable | None = None,
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        header_limit_bytes: int = 12 * 1024,
        url_limit_bytes: int = 8 * 1024,
    ) -> None:
        self.app = app
        self.routes = routes or RouteTable()
        self.body_limit_bytes = body_limit_bytes
        self.header_limit_bytes = header_limit_bytes
        self.url_limit_bytes = url_limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        self._check_head(scope, path)
        if scope["method"] == "POST" and path in INFERENCE_PATHS:
            _check_content_type(scope)
            body = await read_body(scope, receive, limit_bytes=self.body_limit_bytes)
            check_body(body)
            receive = replaying_receive(scope, receive)
        await self.app(scope, receive, send)

    def _check_head(self, scope: Scope, path: str) -> None:
        raw_path, query = route_raw_path(scope), scope.get("query_string", b"")
        if len(raw_path) + len(query) + 1 > self.url_limit_bytes:
            raise InvalidRequest(
                f"The URL is longer than {self.url_limit_bytes} bytes.", status=414, code="uri_too_long"
            )
        headers = scope.get("headers", ())
        if sum(len(name) + len(value) + 4 for name, value in headers) > self.header_limit_bytes:
            raise InvalidRequest(
                f"The request headers are larger than {self.header_limit_bytes} bytes.",
                status=431,
                code="headers_too_large",
            )
        names = {name.lower() for name, _ in headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            # RFC 9112 §6.1: a request smuggling vector; refuse it and close the connection. Telemetry
            # reads inference bodies before this layer runs: read_body refuses the same first.
            raise InvalidRequest(
                "The request has both Content-Length and Transfer-Encoding.", headers=[("Connection", "close")]
            )
        for part, what in ((raw_path, "path"), (query, "query string")):
            try:
                unquote_to_bytes(part).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"The {what} is not valid UTF-8 once percent-decoded.") from None
        if not self.routes.allows(path):
            raise InvalidRequest(
                f"lmgate does not serve {path!r}; see the list of forwarded routes in docs.",
                status=404,
                code="not_found",
            )
        methods = _METHODS.get(path)
        if methods is not None and scope["method"] not in methods and scope["method"] != "OPTIONS":
            allowed = ", ".join(sorted(methods))
            raise InvalidRequest(
                f"{path} accepts {allowed}, not {scope['method']}.",
                status=405,
                code="method_not_allowed",
                headers=[("Allow", allowed)],
            )


def _check_content_type(scope: Scope) -> None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-type":
            media_type = value.split(b";", 1)[0].strip().lower()
            if media_type and media_type != b"application/json" and not media_type.endswith(b"+json"):
                raise InvalidRequest(
                    f"Send the body as JSON with 'Content-Type: application/json', not {media_type.decode('latin-1')!r}.",
                    status=415,
                    code="unsupported_media_type",
                )
            return


def check_body(body: bytes) -> dict[str, Any]:
    """The body of a model route as a JSON object, or ``InvalidRequest`` saying what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant) if text.strip() else None
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {_reason(exc)}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("The body must be a JSON object naming a model.", param=None)
    model = document.get("model")
    if model is None or model == "":
        raise InvalidRequest("The body must name a model: add \"model\".", code="missing_required_parameter", param="model")
    if not isinstance(model, str):
        raise InvalidRequest("\"model\" must be a string.", code="invalid_type", param="model")
    stream = document.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("\"stream\" must be true or false.", code="invalid_type", param="stream")
    options = document.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("\"stream_options\" must be an object.", code="invalid_type", param="stream_options")
    return document


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _reason(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
