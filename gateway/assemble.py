"""Assemble a non-streaming completion from an upstream event stream.

Why: LM Studio generates a non-streaming completion to the end even when its client has left (it
notices only when it writes the answer), while a stream is stopped within a token. So for a
non-streaming client lmgate asks the upstream for a stream, and when the client leaves, closing
that stream stops the model. The assembled body has the shape the upstream returns without
streaming (ids, content, reasoning, tool calls, finish_reason, usage), so clients cannot tell.
Errors reported in the stream (``event: error`` after a 200) become ordinary HTTP errors, because
nothing has been sent to the client yet.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import StreamCut, UpstreamProtocolError, UpstreamReported
from gateway.sse import DEFAULT_FRAME_BYTES, Frame, FrameParser


def streaming_request_body(document: dict[str, Any]) -> bytes:
    """The client's non-streaming request, asking the upstream for a stream with usage."""
    upstream = dict(document)
    upstream["stream"] = True
    options = dict(upstream.get("stream_options") or {})
    options["include_usage"] = True
    upstream["stream_options"] = options
    try:
        return json.dumps(upstream, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" is valid JSON): pass it on escaped, as it came
        return json.dumps(upstream, separators=(",", ":")).encode()


class CompletionAssembler:
    """Feeds on SSE text; ``result()`` returns the non-streaming body as a dict.

    ``kind`` is "chat" (``chat.completion``) or "text" (legacy ``text_completion``).
    """

    def __init__(self, kind: str, *, max_frame_bytes: int = DEFAULT_FRAME_BYTES) -> None:
        if kind not in ("chat", "text"):
            raise ValueError(f"unknown completion kind {kind!r}")
        self.kind = kind
        self._parser = FrameParser(max_frame_bytes)
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self._reasoning_frames = 0
        self._done = False

    def feed(self, text: str) -> None:
        for frame in self._parser.feed(text):
            self._take(frame)

    def result(self) -> dict[str, Any]:
        for frame in self._parser.close():
            self._take(frame)
        if not self._done:
            raise StreamCut("The upstream stream ended before `data: [DONE]`; the answer is incomplete.")
        if not self._head:
            raise UpstreamProtocolError("The upstream stream carried no completion chunks.")
        body: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
            "choices": [self._choice(index) for index in sorted(self._choices)],
        }
        if self._usage is not None:
            body["usage"] = self._usage_with_details()
        body["stats"] = {}
        if "system_fingerprint" in self._head:
            body["system_fingerprint"] = self._head["system_fingerprint"]
        return body

    # --- frames -----------------------------------------------------------------------------

    def _take(self, frame: Frame) -> None:
        if self._done:
            return
        if frame.data == "[DONE]":
            self._done = True
            return
        try:
            chunk = json.loads(frame.data)
        except ValueError as exc:
            raise UpstreamProtocolError(f"The upstream sent a frame that is not JSON: {frame.data[:200]!r}") from exc
        if frame.event == "error" or (isinstance(chunk, dict) and "error" in chunk):
            raise UpstreamReported.from_message(_error_message(chunk))
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError("The upstream sent a frame that is not a JSON object.")
        if not self._head:
            self._head = {key: chunk[key] for key in ("id", "created", "model", "system_fingerprint") if key in chunk}
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self._merge_choice(choice)

    def _merge_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        state = self._choices.setdefault(index, {"fields": {}, "tool_calls": {}, "finish_reason": None})
        if choice.get("finish_reason") is not None:
            state["finish_reason"] = choice["finish_reason"]
        if self.kind == "text":
            text = choice.get("text")
            if isinstance(text, str):
                state["fields"]["text"] = state["fields"].get("text", "") + text
            return
        delta = choice.get("delta") or {}
        if delta.get("reasoning_content") or delta.get("reasoning"):
            self._reasoning_frames += 1
        for key, value in delta.items():
            if key == "tool_calls":
                for call in value or ():
                    _merge_tool_call(state["tool_calls"], call)
            elif key == "role":
                state["fields"].setdefault("role", value)
            elif isinstance(value, str):
                state["fields"][key] = state["fields"].get(key, "") + value

    def _usage_with_details(self) -> Any:
        """LM Studio's non-streaming usage has ``completion_tokens_details``; its stream usage frame
        does not. It sends one token per delta frame, so the reasoning frames counted are the count."""
        usage = self._usage
        if self.kind != "chat" or not isinstance(usage, dict) or "completion_tokens_details" in usage:
            return usage
        detailed: dict[str, Any] = {}
        for key, value in usage.items():
            detailed[key] = value
            if key == "completion_tokens":
                detailed["completion_tokens_details"] = {"reasoning_tokens": self._reasoning_frames}
        return detailed

    def _choice(self, index: int) -> dict[str, Any]:
        state = self._choices[index]
        fields = state["fields"]
        if self.kind == "text":
            return {"index": index, "text": fields.get("text", ""), "logprobs": None,
                    "finish_reason": state["finish_reason"]}
        message: dict[str, Any] = {"role": fields.get("role", "assistant"), "content": fields.get("content", "")}
        for key, value in fields.items():
            if key not in ("role", "content"):
                message[key] = value
        # LM Studio's non-streaming message always carries both, empty when unused.
        message.setdefault("reasoning_content", "")
        message["tool_calls"] = [state["tool_calls"][i] for i in sorted(state["tool_calls"])]
        return {"index": index, "message": message, "logprobs": None, "finish_reason": state["finish_reason"]}


def _merge_tool_call(calls: dict[int, dict[str, Any]], piece: dict[str, Any]) -> None:
    """Tool calls stream as pieces: id, type and name first, then argument fragments."""
    index = piece.get("index", len(calls))
    call = calls.setdefault(index, {"type": "function", "function": {"name": "", "arguments": ""}})
    if piece.get("id"):
        call["id"] = piece["id"]
    if piece.get("type"):
        call["type"] = piece["type"]
    function = piece.get("function") or {}
    if function.get("name"):
        call["function"]["name"] += function["name"]
    if function.get("arguments"):
        call["function"]["arguments"] += function["arguments"]
    # Key order as in a non-streaming body: id, type, function.
    calls[index] = {key: call[key] for key in ("id", "type", "function") if key in call}


def _error_message(chunk: Any) -> str:
    if isinstance(chunk, dict):
        error = chunk.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if chunk.get("message"):
            return str(chunk["message"])
    return "The upstream reported an error in its stream."
