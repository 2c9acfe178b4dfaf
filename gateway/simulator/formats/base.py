"""What every wire format shares: the parsed request, the answer being produced, the SSE framing.

A *dialect* turns one answer into one API's bytes: ``/v1/chat/completions`` chunks, Responses API
events, Anthropic message events. The generation loop in :mod:`gateway.simulator.generation` is
the same for all of them; it asks the dialect for frames as tokens are produced. Dialects are
created per request (the Responses API numbers its events).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.simulator.errors import SimError, bad_request
from gateway.simulator.http import to_json
from gateway.simulator.spec import SimModel

PieceKind = Literal["reasoning", "content"]


@dataclass(frozen=True)
class Request:
    """The fields of an inference request that change what the simulator does."""

    model: str | None
    prompt_text: str  # what the prompt tokens are counted from
    stream: bool
    max_tokens: int | None
    include_usage: bool = False
    ttl_s: float | None = None


@dataclass
class Answer:
    """One answer: its identity, its planned tokens, and how many have been produced."""

    id: str
    created: int
    spec: SimModel
    context_length: int  # of the instance serving it
    prompt_tokens: int
    reasoning: list[str]
    content: list[str]
    finish_reason: Literal["stop", "length"]
    ttft_s: float = 0.0
    generation_s: float = 0.0
    tokens_per_second: float = 0.0
    emitted_reasoning: int = 0
    emitted_content: int = 0

    @property
    def model(self) -> str:
        return self.spec.id

    @property
    def completion_tokens(self) -> int:
        return self.emitted_reasoning + self.emitted_content

    @property
    def text(self) -> str:
        return "".join(self.content[: self.emitted_content])

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning[: self.emitted_reasoning])


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE frame as LM Studio writes it: ``data: <json>`` and a blank line (``event:`` first if named)."""
    payload = data if isinstance(data, bytes) else to_json(data)
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Dialect:
    """Base: OpenAI-compatible error shapes and no frames; subclasses fill in the rest."""

    route = ""
    id_prefix = "chatcmpl-"
    reasoning = False  # whether reasoning tokens are part of this API's answer

    def parse(self, body: dict[str, Any]) -> Request:
        raise NotImplementedError

    def open_frames(self, answer: Answer) -> list[bytes]:
        """Frames that precede the first token (sent together with it, never earlier)."""
        return []

    def token_frame(self, answer: Answer, piece: str, kind: PieceKind) -> bytes:
        raise NotImplementedError

    def close_frames(self, answer: Answer, request: Request) -> list[bytes]:
        raise NotImplementedError

    def body(self, answer: Answer, request: Request) -> dict[str, Any]:
        raise NotImplementedError

    def error_body(self, error: SimError) -> dict[str, Any]:
        return error.body

    def error_frame(self, error: SimError) -> bytes:
        """LM Studio's in-band error after a 200 (0.4.21 capture): ``event: error`` + the error body."""
        return sse(error.body, event="error")


def text_of(content: Any) -> str:
    """The text of a message ``content``: a string, or a list of parts with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def common_fields(body: dict[str, Any], *, max_tokens_keys: tuple[str, ...]) -> dict[str, Any]:
    """``model``, ``stream``, ``ttl`` and the output cap, checked for type."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    max_tokens = None
    for key in max_tokens_keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad_request(f"'{key}' must be an integer", param=key)
        max_tokens = None if value < 0 else value  # LM Studio: -1 means no limit
        break
    ttl = body.get("ttl")
    if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0):
        raise bad_request("'ttl' must be a positive number of seconds", param="ttl")
    return {"model": model or None, "stream": body.get("stream") is True, "max_tokens": max_tokens, "ttl_s": ttl}
