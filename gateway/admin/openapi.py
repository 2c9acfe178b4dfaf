"""lmgate's own OpenAPI 3.1 description, served at ``GET /lmgate/openapi.json``.

It describes what lmgate itself answers: its own routes (health, readiness, metrics, models, the
status page) and the four OpenAI routes it forwards, with what lmgate checks in their bodies
(``gateway.request.validation``) and the errors it adds (``middleware.errors``). The rest of a forwarded
body is LM Studio's to judge: its errors keep their status and, when they are JSON, are normalised
into the same ``{"error": {"message", "type", "code"}}`` shape with ``X-Lmgate-Error``. LM Studio's
other routes (``/v1/responses``, ``/v1/messages``, ``/api/v0/...``, ``/api/v1/...``) are forwarded
as well, but not described here.

The document is built for one gateway from its configuration: with client keys, every route
outside ``auth.open_paths`` needs a bearer key (401 without one) and the POST routes an admin key
(403 with a client key); ``/metrics`` is described only when metrics are on.
tests/security/test_openapi.py runs schemathesis against a real lmgate with this description.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.config.settings import Config

__all__ = ["OPENAPI_PATH", "openapi_document"]

OPENAPI_PATH = "/lmgate/openapi.json"
_KEY = "clientKey"
_DESCRIPTION = (
    "A dependable streaming gateway in front of LM Studio. Described: lmgate's own routes and the OpenAI routes "
    "it forwards, with what lmgate checks; the rest of a forwarded body is LM Studio's to judge, and its errors "
    "keep their status, normalised into the same error shape. Every error lmgate reports is "
    '`{"error": {"message", "type", "code"}}` with `X-Lmgate-Error: <code>`.'
)
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema) -> dict[str, Schema]:
    return {"application/json": {"schema": schema}}


def _object(*required: str, **properties: Schema) -> Schema:
    return {"type": "object", "required": list(required), "properties": properties}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


_STRING, _INT, _NUMBER, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
_ANY_OBJECT: Schema = {"type": "object"}

# --- what lmgate checks in a forwarded body (gateway.request.validation.check_body) ---------------------

_MODEL: Schema = {
    "type": "string",
    "minLength": 1,
    "description": "Required by lmgate (400 `missing_required_parameter`, or `invalid_type` if not a string). "
    "Whether the model exists is LM Studio's answer.",
    "examples": ["qwen2.5-7b-instruct"],
}
_STREAM: Schema = {
    "type": ["boolean", "null"],
    "description": "An event stream (`text/event-stream`) when true; anything but a boolean or null is 400 "
    "`invalid_type`.",
}
_STREAM_OPTIONS: Schema = {
    "type": ["object", "null"],
    "description": "OpenAI's stream options; lmgate adds `include_usage` to its own upstream requests, so anything "
    "but an object or null is 400 `invalid_type`.",
}
_PASSED_ON = "Passed on to LM Studio unchecked."


def _inference_body(example: Schema, **fields: Schema) -> Schema:
    properties = {"model": _MODEL, "stream": _STREAM, "stream_options": _STREAM_OPTIONS}
    properties.update({name: {**schema, "description": _PASSED_ON} for name, schema in fields.items()})
    return {
        "required": True,
        "description": "A JSON object (`Content-Type: application/json`, or none; another type is 415). Fields other "
        "than `model`, `stream` and `stream_options` are LM Studio's to check.",
        "content": {"application/json": {
            "schema": {"type": "object", "required": ["model"], "properties": properties},
            "example": example,
        }},
    }


_CHAT_EXAMPLE = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
_TEXT_EXAMPLE = {"model": "qwen2.5-7b-instruct", "prompt": "Once upon a time", "max_tokens": 8}
_EMBED_EXAMPLE = {"model": "text-embedding-nomic-embed-text-v1.5", "input": "lmgate"}

# --- documents ---------------------------------------------------------------------------------

_LOADS = _object("count", "last_s", "median_s", count=_INT, last_s=_nullable(_NUMBER), median_s=_nullable(_NUMBER))
_MODEL_ENTRY = _object(
    "id", "state", "instances", "loading", "load_error", "loads", "in_flight", "queued",
    id=_STRING,
    type=_nullable(_STRING),
    state={"enum": ["unknown", "not-loaded", "loading", "loaded", "failed"]},
    instances={"type": "array", "items": _STRING},
    size_bytes=_nullable(_INT),
    loading=_nullable(
        _object("elapsed_s", elapsed_s=_NUMBER, eta_s=_nullable(_NUMBER), expected_s=_nullable(_NUMBER))
    ),
    load_error=_nullable(_STRING),
    loads=_LOADS,
    idle_s=_nullable(_NUMBER),
    in_flight=_INT,
    queued=_INT,
    preload=_BOOL,
    keep_warm=_BOOL,
    ttl_s=_nullable(_NUMBER),
)
_PERCENTILES = _object("p50", "p95", "p99", p50=_INT, p95=_INT, p99=_INT)
_ROLLING = _nullable(_object(
    "count", "latency_ms", count=_INT, window_s=_NUMBER, latency_ms=_PERCENTILES, ttft_ms=_nullable(_PERCENTILES)
))

_SCHEMAS: dict[str, Schema] = {
    "Error": _object("error", error=_object(
        "message", "type", "code",
        message=_STRING,
        type={**_STRING, "description": "OpenAI's error type: `invalid_request_error`, `server_error`, ..."},
        code={**_STRING, "description": "Stable; the same as `X-Lmgate-Error`. See docs/troubleshooting.md."},
        param=_nullable(_STRING),
    )),
    "Status": _object("status", status=_STRING, reason=_STRING, models={"type": "array", "items": _STRING}),
    "LlmHealth": _object(
        "status", "checked_at", "models", "cached",
        status={"enum": ["ok", "unhealthy", "unknown"]},
        checked_at=_STRING,
        cached=_BOOL,
        reason=_STRING,
        models={"type": "object", "additionalProperties": _object(
            "status", "ok", "latency_ms", "reason", "rolling",
            status={"enum": ["ok", "failed", "skipped"]},
            ok={**_nullable(_BOOL), "description": "null when skipped: the model cannot chat, or the upstream refused the probe itself"},
            latency_ms=_nullable(_INT),
            reason=_nullable(_STRING),
            rolling=_ROLLING,
        )},
    ),
    "Model": _MODEL_ENTRY,
    "Models": _object(
        "upstream", "api", "ready", "models",
        upstream=_STRING,
        api=_nullable(_STRING),
        refreshed_s_ago=_nullable(_NUMBER),
        refresh_error=_nullable(_STRING),
        ready=_BOOL,
        preload_pending={"type": "array", "items": _STRING},
        loads=_ANY_OBJECT,
        models={"type": "array", "items": _ref("Model")},
    ),
    "Loaded": _object("model", "status", "load_s", model=_STRING, status={"enum": ["loaded", "already_loaded"]},
                      load_s=_nullable(_NUMBER)),
    "Unloaded": _object("model", "unloaded", model=_STRING, unloaded={"type": "array", "items": _STRING}),
    "StatusPage": _object(
        "version", "uptime_s", "upstream", "ready", "draining", "in_flight", "models", "concurrency", "breakers",
        "latency", "series", "errors", "cache",
        version=_STRING,
        uptime_s=_INT,
        upstream=_ANY_OBJECT,
        ready=_BOOL,
        draining=_BOOL,
        in_flight=_INT,
        models={"type": "array", "items": _ref("Model")},
        concurrency=_ANY_OBJECT,
        breakers={"type": "object", "additionalProperties": {"enum": ["closed", "open", "half_open"]}},
        latency={"type": "object", "additionalProperties": _ROLLING},
        series={"type": "array", "items": _ANY_OBJECT},
        errors=_object("window_s", "by_category", "recent", window_s=_NUMBER, by_category=_ANY_OBJECT,
                       recent={"type": "array", "items": _ANY_OBJECT}),
        cache=_nullable(_ANY_OBJECT),
        shared_state=_nullable(_object("available", "for_s", "last_error", available=_BOOL, for_s=_NUMBER,
                                       last_error=_nullable(_STRING))),
    ),
    "Event": {**_object(
        "data",
        event={**_STRING, "description": "`message` for chunks; `error` for an error that ended the stream."},
        data={**_STRING, "description": "One JSON chunk, an error in the shape above, or `[DONE]` at the end."},
    ), "description": "One event of a stream (OpenAPI 3.1: `schema` describes each event). Comments (`: lmgate ...`) "
       "keep a silent stream alive; `data: [DONE]` ends a finished one."},
    "ModelList": _object("object", "data", object={"const": "list"}, data={"type": "array", "items": _object(
        "id", id=_STRING, object=_STRING
    )}),
    "ChatCompletion": _object("object", "choices", id=_STRING, object={"const": "chat.completion"}, model=_STRING,
                              choices={"type": "array", "items": _ANY_OBJECT}, usage=_ANY_OBJECT),
    "TextCompletion": _object("object", "choices", id=_STRING, object={"const": "text_completion"}, model=_STRING,
                              choices={"type": "array", "items": _ANY_OBJECT}, usage=_ANY_OBJECT),
    "Embeddings": _object("object", "data", object={"const": "list"}, model=_STRING, usage=_ANY_OBJECT,
                          data={"type": "array", "items": _object(
                              "embedding", "index", embedding={"type": "array", "items": _NUMBER}, index=_INT
                          )}),
}

# --- errors ------------------------------------------------------------------------------------

_ERRORS: dict[int, str] = {
    400: "Malformed: `bad_request`, `missing_required_parameter`, `invalid_type` (with `param`), a path that cannot "
    "be read one way only (`bad_request`: `%25`, NUL, `\\`, `;`); or LM Studio's own 400 passed on "
    "(`model_not_found`, `context_length_exceeded`, ...).",
    401: "`invalid_api_key`: no valid client key (once `auth.keys` are configured), or LM Studio refused lmgate's "
    "token (`upstream.api_key_env`).",
    403: "`permission_denied`: this route changes state and needs an admin key; or an open path read from "
    "another machine with `auth.open_from: loopback` and no keys.",
    404: "`not_found`: no such route, or no such model.",
    405: "`method_not_allowed`; `Allow` lists the methods.",
    408: "`request_timeout`: the body stalled (`limits.body_idle_s`, `limits.body_total_s`); the connection closes.",
    409: "`model_busy`: requests are using the model; add `?force=true`. `model_pinned`: `models.pin` keeps "
         "the model off the upstream named.",
    413: "`payload_too_large`: the body is over `limits.body_bytes`.",
    414: "`uri_too_long`: path and query over `limits.url_bytes`.",
    415: "`unsupported_media_type`: the body is not sent as JSON.",
    429: "`rate_limited`: this key is over `auth.per_key_limit`; or LM Studio's own 429.",
    431: "`headers_too_large`: the headers are over `limits.header_bytes`.",
    500: "LM Studio's own 500, passed on. (`internal_error` is a bug in lmgate: please report it.)",
    501: "`not_supported`: the upstream has no API for this (unloading needs LM Studio's `/api/v1`).",
    502: "`upstream_unavailable`, `upstream_protocol_error`, `stream_cut`, `model_load_failed`, `upstream_error`.",
    503: "`overloaded`, `draining`, `circuit_open`, `model_loading` (with `Retry-After` where known); or LM Studio "
    "busy.",
    504: "`timeout` (a lmgate deadline: first token, idle, total) or `upstream_timeout`.",
}
_HEADER_CODE = {"description": "The error's `code`.", "required": True, "schema": _STRING}
_EXTRA_HEADERS: dict[int, dict[str, Schema]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": _STRING}},
    405: {"Allow": {"required": True, "schema": _STRING}},
    503: {"Retry-After": {"description": "Seconds.", "schema": _STRING}},
}


def _error_responses() -> dict[str, Schema]:
    return {
        str(status): {
            "description": text,
            "headers": {"X-Lmgate-Error": _HEADER_CODE, **_EXTRA_HEADERS.get(status, {})},
            "content": _json(_ref("Error")),
        }
        for status, text in _ERRORS.items()
    }


def _errors(*statuses: int) -> dict[str, Schema]:
    return {str(status): {"$ref": f"#/components/responses/{status}"} for status in statuses}


# --- routes ------------------------------------------------------------------------------------

_FORWARDED_ERRORS = (400, 401, 404, 408, 413, 414, 415, 429, 431, 500, 502, 503, 504)


def _operation(tag: str, summary: str, responses: dict[str, Schema], **more: Any) -> Schema:
    return {"tags": [tag], "summary": summary, "responses": responses, **more}


def _ok(schema: Schema, description: str = "OK") -> dict[str, Schema]:
    return {"200": {"description": description, "content": _json(schema)}}


def _model_id(description: str) -> Schema:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": description + " An id with `/` in it is sent with `%2F`.",
        "schema": {"type": "string", "minLength": 1},
        "example": "qwen2.5-7b-instruct",
    }


def _own_paths(*, metrics: bool) -> dict[str, Schema]:
    paths: dict[str, Schema] = {
        "/healthz": {"get": _operation("health", "Liveness: the process serves requests", _ok(_ref("Status")))},
        "/readyz": {"get": _operation(
            "health", "Readiness from known state (never an upstream request): not draining, preloads done, "
            "circuit not open, upstream not found unreachable",
            {**_ok(_ref("Status"), "`ready`"), "503": {
                "description": "`draining`, `preloading` (with `models`), `circuit_open` or `upstream_unreachable` "
                "(with `reason`).",
                "content": _json(_ref("Status")),
            }},
        )},
        "/lmgate/health/llm": {"get": _operation(
            "health", "A 1-token generation per model, cached, and the rolling latency",
            {**_ok(_ref("LlmHealth"), "`ok`: no check failed and at least one produced a token; `unknown`: "
                   "every model was skipped (none can chat)."), "503": {
                "description": "A check failed, or there was no model to check.", "content": _json(_ref("LlmHealth"))
            }},
        )},
        "/lmgate/models": {"get": _operation(
            "models", "Every model the upstream lists, with its state", _ok(_ref("Models"))
        )},
        "/lmgate/models/{id}": {"get": _operation(
            "models", "One model", {**_ok(_ref("Model")), **_errors(400, 404)},
            parameters=[_model_id("The model's id.")],
        )},
        "/lmgate/models/{id}/load": {"post": _operation(
            "models", "Load the model now (single flight with requests)", {**_ok(_ref("Loaded")), **_errors(400, 502)},
            parameters=[_model_id("The model to load.")],
        )},
        "/lmgate/models/{id}/unload": {"post": _operation(
            "models", "Unload every instance of the model, or the one named",
            {**_ok(_ref("Unloaded")), **_errors(400, 409, 501, 502)},
            parameters=[_model_id("The model, or one instance (`key:2`)."), {
                "name": "force", "in": "query", "required": False, "schema": _STRING,
                "description": "`true`, `1` or `yes`: unload even while requests use it (they fail); else no.",
            }],
        )},
        "/lmgate/": {"get": _operation(
            "status", "The status page (also at `/lmgate`)",
            {"200": {"description": "One self-contained HTML page.", "content": {"text/html": {"schema": _STRING}}}},
        )},
        "/lmgate/status.json": {"get": _operation("status", "What the status page shows", _ok(_ref("StatusPage")))},
        OPENAPI_PATH: {"get": _operation("status", "This description", _ok(_ANY_OBJECT))},
    }
    if metrics:
        text = {"schema": _STRING}
        paths["/metrics"] = {"get": _operation("health", "Prometheus metrics", {"200": {
            "description": "Prometheus text, or OpenMetrics when `Accept` asks for it.",
            "content": {"text/plain": text, "application/openmetrics-text": text},
        }})}
    return paths


def _inference(summary: str, body: Schema, result: str) -> Schema:
    ok = {"200": {
        "description": "LM Studio's answer (lmgate assembles non-streaming completions from a stream).",
        "content": {**_json(_ref(result)), "text/event-stream": {"schema": _ref("Event")}},
    }}
    return {"post": _operation("inference", summary, {**ok, **_errors(*_FORWARDED_ERRORS)}, requestBody=body)}


def _forwarded_paths() -> dict[str, Schema]:
    return {
        "/v1/chat/completions": _inference(
            "Chat completion, forwarded to LM Studio", _inference_body(_CHAT_EXAMPLE, messages={}), "ChatCompletion"
        ),
        "/v1/completions": _inference(
            "Text completion, forwarded to LM Studio", _inference_body(_TEXT_EXAMPLE, prompt={}), "TextCompletion"
        ),
        "/v1/embeddings": _inference(
            "Embeddings, forwarded to LM Studio", _inference_body(_EMBED_EXAMPLE, input={}), "Embeddings"
        ),
        "/v1/models": {"get": _operation(
            "inference", "LM Studio's model list, forwarded",
            {**_ok(_ref("ModelList")), **_errors(400, 401, 404, 414, 429, 431, 500, 502, 503, 504)},
        )},
    }


def _require_keys(paths: dict[str, Schema], open_paths: tuple[str, ...], *, loopback_only: bool) -> None:
    """With client keys: 401 without one outside ``open_paths`` (GET; inside them too from another
    machine with ``open_from: loopback``), 403 for a client key on POST."""
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "get" and path in open_paths:
                operation["security"] = []
                if loopback_only:
                    operation["responses"].update(_errors(401))
                continue
            admin_only = method == "post" and path.startswith("/lmgate/")  # gateway.admin.routes.requires_admin_key
            operation["responses"].update(_errors(401, *((403,) if admin_only else ())))


def _several_upstreams(paths: dict[str, Any], schemas: dict[str, Schema], names: list[str]) -> None:
    """``/lmgate/models`` as it answers with several upstreams (docs/upstreams.md)."""
    schemas["Loaded"] = {**schemas["Loaded"], "required": [*schemas["Loaded"]["required"], "upstream"],
                         "properties": {**schemas["Loaded"]["properties"], "upstream": {"enum": names}}}
    schemas["Unloaded"] = _object("model", "unloaded", model=_STRING, unloaded={
        "type": "object", "additionalProperties": {"type": "array", "items": _STRING},
        "description": "The instances unloaded, by upstream.",
    })
    schemas["ModelOnUpstreams"] = _object(
        "id", "upstreams", id=_STRING, upstreams={"type": "object", "additionalProperties": _ref("Model")}
    )
    one = paths["/lmgate/models/{id}"]["get"]
    one["responses"] = {**one["responses"], **_ok(_ref("ModelOnUpstreams"))}
    upstream = {
        "name": "upstream", "in": "query", "required": False, "schema": {"enum": names},
        "description": "The upstream to act on; without it a load goes where the router would send the model, "
        "an unload acts on every upstream that has the model loaded.",
    }
    for action in ("load", "unload"):
        operation = paths[f"/lmgate/models/{{id}}/{action}"]["post"]
        operation["parameters"] = [*operation["parameters"], upstream]
        operation["responses"] = {**operation["responses"], **_errors(404, 409)}


def openapi_document(config: Config) -> dict[str, Any]:
    """The description of the gateway built from ``config``; see the module docstring."""
    paths = {**_own_paths(metrics=config.metrics.enabled), **_forwarded_paths()}
    components: dict[str, Any] = {"schemas": dict(_SCHEMAS), "responses": _error_responses()}
    names = [upstream.name for upstream in config.upstream_list()]
    if len(names) > 1:
        _several_upstreams(paths, components["schemas"], names)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "lmgate",
            "version": __version__,
            "description": _DESCRIPTION,
        },
        "tags": [{"name": name} for name in ("inference", "health", "models", "status")],
        "paths": paths,
        "components": components,
    }
    if config.auth.enabled:
        _require_keys(paths, config.auth.open_paths, loopback_only=config.auth.open_from == "loopback")
        components["securitySchemes"] = {_KEY: {
            "type": "http",
            "scheme": "bearer",
            "description": "A client key (`X-Api-Key` works too); admin keys open every route.",
        }}
        document["security"] = [{_KEY: []}]
    elif config.auth.open_from == "loopback":  # no keys: the open paths refuse other machines
        for path in config.auth.open_paths:
            if "get" in paths.get(path, {}):
                paths[path]["get"]["responses"].update(_errors(403))
    return document
