"""``/v1/responses`` (LM Studio 0.3.29+): OpenAI Responses API objects and named SSE events.

Stream: ``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, one ``response.output_text.delta`` per token,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``, then
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut the answer). Every
event carries ``type`` and a ``sequence_number``; there is no ``[DONE]``. As on the chat route,
nothing is sent before the first token (LM Studio is silent while it loads and prefills).
"""

from __future__ import annotations

from typing import Any

from gateway.simulator.errors import SimError, bad_request
from gateway.simulator.formats.base import Answer, Dialect, PieceKind, Request, common_fields, sse, text_of


class Responses(Dialect):
    route = "/v1/responses"
    id_prefix = "resp_"

    def __init__(self) -> None:
        self._sequence = 0
        self._instructions: str | None = None
        self._max_output_tokens: int | None = None

    def parse(self, body: dict[str, Any]) -> Request:
        raw = body.get("input")
        if isinstance(raw, str):
            prompt = raw
        elif isinstance(raw, list) and all(isinstance(item, dict) for item in raw):
            prompt = "".join(text_of(item.get("content")) for item in raw)
        else:
            raise bad_request("'input' must be a string or an array of input items", param="input")
        instructions = body.get("instructions")
        self._instructions = instructions if isinstance(instructions, str) else None
        fields = common_fields(body, max_tokens_keys=("max_output_tokens",))
        self._max_output_tokens = fields["max_tokens"]
        return Request(prompt_text=(self._instructions or "") + prompt, **fields)

    def _event(self, kind: str, **payload: Any) -> bytes:
        frame = sse({"type": kind, "sequence_number": self._sequence, **payload}, event=kind)
        self._sequence += 1
        return frame

    @staticmethod
    def _item_id(answer: Answer) -> str:
        return "msg_" + answer.id.removeprefix("resp_")

    def _part(self, answer: Answer) -> dict[str, Any]:
        return {"type": "output_text", "text": answer.text, "annotations": []}

    def _item(self, answer: Answer, status: str) -> dict[str, Any]:
        content = [self._part(answer)] if status == "completed" else []
        item_id = self._item_id(answer)
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _response(self, answer: Answer, status: str) -> dict[str, Any]:
        done = status != "in_progress"
        return {
            "id": answer.id,
            "object": "response",
            "created_at": answer.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self._instructions,
            "max_output_tokens": self._max_output_tokens,
            "model": answer.model,
            "output": [self._item(answer, "completed")] if done else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1,
            "truncation": "disabled",
            "usage": self._usage(answer) if done else None,
            "metadata": {},
        }

    @staticmethod
    def _usage(answer: Answer) -> dict[str, Any]:
        return {
            "input_tokens": answer.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": answer.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }

    @staticmethod
    def _status(answer: Answer) -> str:
        return "completed" if answer.finish_reason == "stop" else "incomplete"

    def open_frames(self, answer: Answer) -> list[bytes]:
        where = {"output_index": 0}
        return [
            self._event("response.created", response=self._response(answer, "in_progress")),
            self._event("response.in_progress", response=self._response(answer, "in_progress")),
            self._event("response.output_item.added", **where, item=self._item(answer, "in_progress")),
            self._event(
                "response.content_part.added",
                item_id=self._item_id(answer),
                **where,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]

    def token_frame(self, answer: Answer, piece: str, kind: PieceKind) -> bytes:
        return self._event(
            "response.output_text.delta", item_id=self._item_id(answer), output_index=0, content_index=0, delta=piece
        )

    def close_frames(self, answer: Answer, request: Request) -> list[bytes]:
        where = {"item_id": self._item_id(answer), "output_index": 0, "content_index": 0}
        status = self._status(answer)
        return [
            self._event("response.output_text.done", **where, text=answer.text),
            self._event("response.content_part.done", **where, part=self._part(answer)),
            self._event("response.output_item.done", output_index=0, item=self._item(answer, "completed")),
            self._event(f"response.{status}", response=self._response(answer, status)),
        ]

    def body(self, answer: Answer, request: Request) -> dict[str, Any]:
        return self._response(answer, self._status(answer))

    def error_frame(self, error: SimError) -> bytes:
        """OpenAI's ``error`` event (LM Studio's in-band form for this route was not captured)."""
        code = error.body["error"].get("code") if isinstance(error.body.get("error"), dict) else None
        return self._event("error", code=code, message=error.message, param=None)
