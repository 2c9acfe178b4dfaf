"""What one request did, gathered while it runs, and the few facts derived from its route and body.

The telemetry layer creates a :class:`RequestRecord` per request and puts it in
``scope["state"]``, so layers further in can add what only they see (the proxy: token usage and
errors the upstream reported inside a stream; the admission mark: when a concurrency slot was
granted; a model-load observer: that the model was cold). At the end the layer turns the record
into one log line, metric samples and the span's closing attributes, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.request.routes import LMSTUDIO_PATHS, LMSTUDIO_PREFIXES
from middleware.types import Scope

RECORD_KEY = "lmgate.telemetry"

# GenAI semantic-convention operation names by route (``gen_ai.operation.name``).
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/api/v0/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/v1/completions": "text_completion",
    "/api/v0/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/api/v0/embeddings": "embeddings",
}
#: The operation label of forwarded requests that are not an inference (model lists, the greeting).
NOT_INFERENCE = "http"


class RequestRecord:
    """One request's observations. Written by several layers, read once when the request ends."""

    __slots__ = (
        "started_at",
        "route",
        "operation",
        "model",
        "stream",
        "prompt_chars",
        "prompt",
        "inject_usage",
        "usage",
        "usage_counted",
        "response_model",
        "response_id",
        "status",
        "event_stream",
        "error_code",
        "error_message",
        "first_byte_at",
        "admitted_at",
        "model_load_s",
        "model_state",
        "upstream",
        "span",
    )

    def __init__(self, started_at: float, route: str, operation: str | None) -> None:
        self.started_at = started_at
        self.route = route
        self.operation = operation
        self.model: str | None = None
        self.stream = False
        self.prompt_chars = 0
        self.prompt: str | None = None
        #: The proxy should ask the upstream for a usage frame (and strip it): the client did not.
        self.inject_usage = False
        self.usage: dict[str, Any] | None = None
        #: How lmgate made ``usage`` up when the upstream reported none: token type ("input",
        #: "output") -> "counted" or "estimated". None: the upstream's own report.
        self.usage_counted: dict[str, str] | None = None
        self.response_model: str | None = None
        self.response_id: str | None = None
        self.status = 0
        self.event_stream = False
        #: Code of an error reported without an exception: a header, or an SSE error frame.
        self.error_code: str | None = None
        self.error_message: str | None = None
        self.first_byte_at: float | None = None
        self.admitted_at: float | None = None
        self.model_load_s: float | None = None
        #: "warm", "cold" or "unknown" as the cold-start layer reported it (X-Lmgate-Model-State).
        self.model_state: str | None = None
        #: The name of the upstream that served the request (set when it ends; None: none did).
        self.upstream: str | None = None
        self.span: Any = None  # an OpenTelemetry span while tracing, else None

    def note_usage(
        self, usage: object, document: dict[str, Any] | None = None, *, counted: dict[str, str] | None = None
    ) -> None:
        """Keep the token usage (and the response's model and id, when known); ``counted`` when
        lmgate counted it itself (see ``usage_counted``), else it is the upstream's report."""
        if isinstance(usage, dict):
            self.usage = usage
            self.usage_counted = counted
        if document is not None:
            model, rid = document.get("model"), document.get("id")
            self.response_model = model if isinstance(model, str) else self.response_model
            self.response_id = rid if isinstance(rid, str) else self.response_id

    def note_error(self, code: str, message: str | None) -> None:
        """An error reported in-band (an SSE error frame after a 200), the first one wins."""
        if self.error_code is None:
            self.error_code = code
            self.error_message = message

    def usage_source(self, token_type: str) -> str:
        """Where the ``token_type`` ("input" or "output") count came from: "upstream", "counted", "estimated"."""
        return self.usage_counted.get(token_type, "upstream") if self.usage_counted is not None else "upstream"

    def tokens(self, kind: str) -> int | None:
        """``prompt_tokens`` or ``completion_tokens`` from the usage, when the upstream gave it."""
        value = self.usage.get(kind) if self.usage is not None else None
        return value if isinstance(value, int) and value >= 0 else None


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """How a request ended, derived once from its record; what logs, metrics and spans report."""

    latency_s: float
    status: int
    #: None on success, else one of ``events.CATEGORIES``.
    category: str | None
    code: str | None
    message: str | None
    attempts: int
    ttft_s: float | None
    queue_wait_s: float | None
    tokens_in: int | None
    tokens_out: int | None
    tokens_per_s: float | None
    time_per_token_s: float | None


def record_of(scope: Scope) -> RequestRecord | None:
    """The request's record, or None when no telemetry layer is in front (layers work alone)."""
    state = scope.get("state")
    return state.get(RECORD_KEY) if state is not None else None


def route_label(path: str) -> str:
    """A bounded ``http.route`` value: known routes as they are, prefixed families as ``prefix*``."""
    if path in LMSTUDIO_PATHS:
        return path
    for prefix in LMSTUDIO_PREFIXES:
        if path.startswith(prefix):
            return prefix + "*"
    return "unmatched"


def prompt_text(document: dict[str, Any]) -> str:
    """The text a request sends the model: messages, prompt, input, system and instructions."""
    parts: list[str] = []
    for key in ("system", "instructions", "messages", "prompt", "input"):
        _collect(document.get(key), parts, depth=0)
    return "".join(parts)


def _collect(value: object, parts: list[str], *, depth: int) -> None:
    if isinstance(value, str):
        parts.append(value)
    elif depth > 3:
        return
    elif isinstance(value, list):
        for item in value:
            _collect(item, parts, depth=depth + 1)
    elif isinstance(value, dict):
        # A message ({"content": ...}) or a content part ({"type": "text", "text": ...}).
        _collect(value.get("content"), parts, depth=depth + 1)
        _collect(value.get("text"), parts, depth=depth + 1)
