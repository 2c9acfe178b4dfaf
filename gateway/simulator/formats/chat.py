"""OpenAI-compatible chat and text completions, exactly as LM Studio frames them (research §1.2, §3.2).

Streaming chat: every chunk carries ``id`` (the same for the whole stream), ``object``,
``created``, ``model``, ``system_fingerprint`` (the model id) and one choice with ``logprobs: null``;
the first delta carries ``role: "assistant"``; the last has ``delta: {}`` and the
``finish_reason``; a ``choices: []`` usage chunk follows only with
``stream_options.include_usage``; then ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Any

from gateway.simulator.errors import bad_request
from gateway.simulator.formats.base import DONE, Answer, Dialect, PieceKind, Request, common_fields, sse, text_of

#: The engine each model format runs on, as /api/v0 reports it.
RUNTIMES = {
    "gguf": {"name": "llama.cpp-linux-x86_64-avx2", "version": "1.3.0", "supported_formats": ["gguf"]},
    "mlx": {"name": "mlx-llm-mac-arm64-apple-metal-advsimd", "version": "0.13.0", "supported_formats": ["safetensors"]},
}


def usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


class _OpenAIStream(Dialect):
    """The chunk envelope and the ending shared by chat and text completions."""

    object_name = "chat.completion.chunk"
    whole_object = "chat.completion"

    def whole(self, answer: Answer, choice: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """A non-streaming body: the OpenAI envelope, then what LM Studio adds (``fields``)."""
        return {
            "id": answer.id,
            "object": self.whole_object,
            "created": answer.created,
            "model": answer.model,
            "choices": [choice],
            **fields,
        }

    def envelope(self, answer: Answer, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse(
            {
                "id": answer.id,
                "object": self.object_name,
                "created": answer.created,
                "model": answer.model,
                "system_fingerprint": answer.model,
                "choices": choices,
                **extra,
            }
        )

    def final_choice(self, answer: Answer) -> dict[str, Any]:
        raise NotImplementedError

    def close_frames(self, answer: Answer, request: Request) -> list[bytes]:
        frames = [self.envelope(answer, [self.final_choice(answer)])]
        if request.include_usage:
            frames.append(self.envelope(answer, [], usage=usage(answer)))
        frames.append(DONE)
        return frames


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    return stream and isinstance(options, dict) and options.get("include_usage") is True


class ChatCompletions(_OpenAIStream):
    route = "/v1/chat/completions"
    reasoning = True

    def parse(self, body: dict[str, Any]) -> Request:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise bad_request("'messages' must be an array of message objects", param="messages")
        fields = common_fields(body, max_tokens_keys=("max_tokens", "max_completion_tokens"))
        prompt = "".join(text_of(m.get("content")) for m in messages)
        return Request(prompt_text=prompt, include_usage=_stream_options(body, fields["stream"]), **fields)

    def token_frame(self, answer: Answer, piece: str, kind: PieceKind) -> bytes:
        first = answer.completion_tokens == 1
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        delta["reasoning_content" if kind == "reasoning" else "content"] = piece
        return self.envelope(answer, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def final_choice(self, answer: Answer) -> dict[str, Any]:
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": answer.finish_reason}

    def body(self, answer: Answer, request: Request) -> dict[str, Any]:
        message = {
            "role": "assistant",
            "content": answer.text,
            "reasoning_content": answer.reasoning_text,
            "tool_calls": [],
        }
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
        details = {"reasoning_tokens": answer.emitted_reasoning}
        return self.whole(
            answer,
            choice,
            usage={**usage(answer), "completion_tokens_details": details},
            stats={},
            system_fingerprint=answer.model,
        )


def v0_additions(answer: Answer) -> dict[str, Any]:
    """What ``/api/v0`` adds to a whole body (documented for chat and text completions alike)."""
    return {
        "usage": usage(answer),
        "stats": {
            "tokens_per_second": answer.tokens_per_second,
            "time_to_first_token": round(answer.ttft_s, 3),
            "generation_time": round(answer.generation_s, 3),
            "stop_reason": "eosFound" if answer.finish_reason == "stop" else "maxPredictedTokensReached",
        },
        "model_info": {
            "arch": answer.spec.arch,
            "quant": answer.spec.quantization,
            "format": answer.spec.format,
            "context_length": answer.context_length,
        },
        "runtime": RUNTIMES[answer.spec.format],
    }


class ChatCompletionsV0(ChatCompletions):
    """``/api/v0/chat/completions``: the same stream; the whole body adds ``stats``, ``model_info``, ``runtime``."""

    route = "/api/v0/chat/completions"

    def body(self, answer: Answer, request: Request) -> dict[str, Any]:
        message = {"role": "assistant", "content": answer.text}
        choice = {"index": 0, "logprobs": None, "finish_reason": answer.finish_reason, "message": message}
        return self.whole(answer, choice, **v0_additions(answer))


class Completions(_OpenAIStream):
    """Legacy ``/v1/completions``: ``text_completion`` objects with ``choices[].text``."""

    route = "/v1/completions"
    id_prefix = "cmpl-"
    object_name = whole_object = "text_completion"

    def parse(self, body: dict[str, Any]) -> Request:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompt = "".join(prompt)
        if not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string", param="prompt")
        fields = common_fields(body, max_tokens_keys=("max_tokens",))
        return Request(prompt_text=prompt, include_usage=_stream_options(body, fields["stream"]), **fields)

    def token_frame(self, answer: Answer, piece: str, kind: PieceKind) -> bytes:
        return self.envelope(answer, [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}])

    def final_choice(self, answer: Answer) -> dict[str, Any]:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": answer.finish_reason}

    def body(self, answer: Answer, request: Request) -> dict[str, Any]:
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
        return self.whole(answer, choice, usage=usage(answer), stats={}, system_fingerprint=answer.model)


class CompletionsV0(Completions):
    """``/api/v0/completions``: the same stream; the whole body adds ``stats``, ``model_info``, ``runtime``."""

    route = "/api/v0/completions"

    def body(self, answer: Answer, request: Request) -> dict[str, Any]:
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
        return self.whole(answer, choice, **v0_additions(answer))
