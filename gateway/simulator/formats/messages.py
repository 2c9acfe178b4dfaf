"""``/v1/messages`` (LM Studio 0.4.1+): Anthropic-compatible messages and their SSE events.

Stream: ``message_start``, ``content_block_start``, one ``content_block_delta`` (``text_delta``)
per token, ``content_block_stop``, ``message_delta`` (stop reason, output tokens),
``message_stop``; each as ``event: <type>`` + ``data: {"type": <type>, ...}``. No ``ping``: LM
Studio sends nothing it does not have to. Errors use Anthropic's envelope
(``{"type": "error", "error": {"type", "message"}}``), which is what Anthropic clients parse.
"""

from __future__ import annotations

from typing import Any

from gateway.simulator.errors import SimError, bad_request
from gateway.simulator.formats.base import Answer, Dialect, PieceKind, Request, common_fields, sse, text_of


class Messages(Dialect):
    route = "/v1/messages"
    id_prefix = "msg_"

    def parse(self, body: dict[str, Any]) -> Request:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise bad_request("messages: Field required", param="messages")
        fields = common_fields(body, max_tokens_keys=("max_tokens",))
        prompt = text_of(body.get("system")) + "".join(text_of(m.get("content")) for m in messages)
        return Request(prompt_text=prompt, **fields)

    @staticmethod
    def _stop_reason(answer: Answer) -> str:
        return "end_turn" if answer.finish_reason == "stop" else "max_tokens"

    def _message(self, answer: Answer, *, done: bool) -> dict[str, Any]:
        return {
            "id": answer.id,
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": [{"type": "text", "text": answer.text}] if done else [],
            "stop_reason": self._stop_reason(answer) if done else None,
            "stop_sequence": None,
            "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens},
        }

    def open_frames(self, answer: Answer) -> list[bytes]:
        start = {"type": "message_start", "message": self._message(answer, done=False)}
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return [sse(start, event="message_start"), sse(block, event="content_block_start")]

    def token_frame(self, answer: Answer, piece: str, kind: PieceKind) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        return sse(delta, event="content_block_delta")

    def close_frames(self, answer: Answer, request: Request) -> list[bytes]:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason(answer), "stop_sequence": None},
            "usage": {"output_tokens": answer.completion_tokens},
        }
        return [
            sse({"type": "content_block_stop", "index": 0}, event="content_block_stop"),
            sse(delta, event="message_delta"),
            sse({"type": "message_stop"}, event="message_stop"),
        ]

    def body(self, answer: Answer, request: Request) -> dict[str, Any]:
        return self._message(answer, done=True)

    def error_body(self, error: SimError) -> dict[str, Any]:
        kind = "authentication_error" if error.status == 401 else "invalid_request_error"
        if error.status >= 500:
            kind = "api_error"
        return {"type": "error", "error": {"type": kind, "message": error.message}}

    def error_frame(self, error: SimError) -> bytes:
        return sse({"type": "error", "error": {"type": "api_error", "message": error.message}}, event="error")
