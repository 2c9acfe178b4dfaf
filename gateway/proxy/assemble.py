"""Assemble a non-streaming completion from an upstream event stream.

Why: LM Studio generates a non-streaming completion to the end even when its client has left (it
notices only when it writes the answer), while a stream is stopped within a token. So for a
non-streaming client lmgate asks the upstream for a stream, and when the client leaves, closing
that stream stops the model. The assembled body has the shape the upstream returns without
streaming (ids, content, reasoning, tool calls, finish_reason, usage), so clients cannot tell.
Errors reported in the stream (``event: error`` after a 200) become ordinary HTTP errors, because
nothing has been sent to the client yet.

Two things a stream may lack that a whole answer has:

* ``usage``: an engine that ignores ``stream_options.include_usage`` (llama-cpp-python's server,
  LM Studio before 0.3.18) sends none. The assembler then counts the completion itself: LM Studio
  and llama.cpp send one token per delta frame, so a frame of a choice that carries text (content,
  reasoning, a tool call's name or arguments) counts as one token. An approximation: an engine
  that packs several tokens into a frame is under-counted. The prompt's count comes from the
  proxy (:mod:`gateway.proxy.usage`).
* LM Studio's ``/api/v0`` additions: its streams carry no ``stats``, ``model_info`` or
  ``runtime`` (lmstudio-bug-tracker#676). The assembler times the stream itself (time to first
  token, generation time, tokens per second; ``stop_reason`` from ``finish_reason``) and takes
  ``model_info`` from what the proxy knows of the model. Whatever the stream does carry wins.

:func:`relay_assembled` is what the proxy calls: it reads the upstream's stream whole (bounded by
``limits.assembled_bytes``), fills in what the stream lacked, notes the usage for telemetry and
sends the answer as one JSON body, with ``x-lmgate-usage`` when lmgate counted the usage.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from gateway.models.upstream import UpstreamModels
from gateway.proxy.aiohttp_transport import raw_chunks
from gateway.proxy.headers import downstream_response_headers
from gateway.proxy.sse import DEFAULT_FRAME_BYTES, Frame, FrameParser
from gateway.proxy.upstream_errors import UpstreamReported, translate_transport_error
from gateway.proxy.usage import PromptSource, PromptTokens
from middleware.errors import StreamCut, UpstreamProtocolError
from middleware.types import Send

if TYPE_CHECKING:
    from gateway.telemetry.stream import UsageTap

#: On an assembled answer whose usage lmgate counted (the upstream streamed none):
#: ``counted``, or ``counted; prompt=estimated`` when the prompt's tokens are an estimate.
USAGE_HEADER = b"x-lmgate-usage"
#: The ``model_info`` of a model, for ``/api/v0`` answers lmgate assembles (None: unknown).
ModelInfo = Callable[[str], Awaitable[Mapping[str, Any] | None]]
DEFAULT_ASSEMBLED_LIMIT_BYTES = 64 * 1024 * 1024
# Headers of the upstream's stream that do not describe the assembled JSON body.
_STREAM_HEADERS = (b"content-type", b"content-length", b"content-encoding", b"cache-control")


@dataclass(frozen=True, slots=True)
class AssembledAnswer:
    """A whole answer assembled from a stream."""

    document: dict[str, Any]
    #: How lmgate got the prompt's tokens when it counted the usage itself; None: the upstream's.
    prompt_source: PromptSource | None = None

    @property
    def counted(self) -> dict[str, str] | None:
        """What telemetry records as counted by lmgate (``RequestRecord.usage_counted``)."""
        return {"input": self.prompt_source, "output": "counted"} if self.prompt_source is not None else None

    def body(self) -> bytes:
        return json.dumps(self.document, separators=(",", ":"), ensure_ascii=False).encode()

    def headers(self, response: httpx.Response, *, request_id: str, length: int) -> list[tuple[bytes, bytes]]:
        upstream = downstream_response_headers(response.headers.raw, request_id=request_id, event_stream=False)
        headers = [(k, v) for k, v in upstream if k not in _STREAM_HEADERS]
        headers += [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(length).encode())]
        if self.prompt_source is not None:
            usage = b"counted" if self.prompt_source == "counted" else b"counted; prompt=estimated"
            headers.append((USAGE_HEADER, usage))
        return headers


class Assembly:
    """Assembles the non-streaming answers of one proxy: its limits, the prompt counter for
    streams without usage, and ``model_info`` for ``/api/v0`` answers (None: asked of the
    upstream; the gateway points it at its model registry)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        upstream_url: str,
        *,
        api_key: str | None = None,
        model_info: ModelInfo | None = None,
        limit_bytes: int = DEFAULT_ASSEMBLED_LIMIT_BYTES,
        frame_limit_bytes: int = DEFAULT_FRAME_BYTES,
    ) -> None:
        self.counter = PromptTokens(client, upstream_url)
        self.model_info = model_info or model_info_from(UpstreamModels(client, upstream_url, api_key=api_key))
        self.limit_bytes = limit_bytes
        self.frame_limit_bytes = frame_limit_bytes

    async def relay(
        self, response: httpx.Response, send: Send, *, kind: str, request_id: str, tap: UsageTap | None
    ) -> None:
        """Assemble the upstream's event stream into the whole answer of ``kind``, and send it;
        ``tap`` (telemetry) is given the usage."""
        assembler = CompletionAssembler(kind, max_frame_bytes=self.frame_limit_bytes)  # now: it times the stream
        await _feed(assembler, response, limit_bytes=self.limit_bytes)
        answer = await _complete(assembler, response.request, counter=self.counter, model_info=self.model_info)
        if tap is not None:
            tap.record.note_usage(answer.document.get("usage"), answer.document, counted=answer.counted)
        body = answer.body()
        headers = answer.headers(response, request_id=request_id, length=len(body))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def model_info_from(upstream: UpstreamModels) -> ModelInfo:
    """``model_info`` straight from ``GET /api/v0/models/{model}`` (a proxy without a registry)."""

    async def model_info(model: str) -> Mapping[str, Any] | None:
        facts = await upstream.model_facts(model)
        return (facts.model_info() or None) if facts is not None else None

    return model_info


async def _feed(assembler: CompletionAssembler, response: httpx.Response, *, limit_bytes: int) -> None:
    # SSE is UTF-8 by definition (whatever a charset says); decoding here, not with aiter_text(),
    # spares httpx's text decoder and chunker layers on every answer. An unencoded body (LM Studio
    # never compresses) is read raw, past httpx's generators too; a compressed one is decoded by httpx.
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
    received = 0
    try:
        async for data in response.aiter_bytes() if encoded else raw_chunks(response):
            received += len(data)  # counted as held (decoded): a small compressed body may decode to a huge one
            if received > limit_bytes:
                # The answer is held in memory whole: an upstream gone wild must not exhaust it.
                raise UpstreamProtocolError(
                    f"The upstream's answer is larger than limits.assembled_bytes ({limit_bytes} bytes); "
                    "ask for a stream to receive it."
                )
            assembler.feed(decoder.decode(data))
    except httpx.HTTPError as exc:
        raise translate_transport_error(exc, response_started=False) from exc
    assembler.feed(decoder.decode(b"", final=True))
    assembler.close()


async def _complete(
    assembler: CompletionAssembler, sent: httpx.Request, *, counter: PromptTokens, model_info: ModelInfo
) -> AssembledAnswer:
    """The answer, with the prompt's tokens when the stream had no usage and ``/api/v0``'s model_info."""
    # The request as sent is parsed again only when needed (a prompt may be megabytes long).
    request = _sent_document(sent) if assembler.usage_missing or not assembler.model else {}
    model = assembler.model or _string(request.get("model"))
    prompt_tokens, prompt_source = None, None
    if assembler.usage_missing:  # an engine that ignores stream_options.include_usage
        auth = sent.headers.get("authorization")
        prompt_tokens, prompt_source = await counter.count(
            request, model=model, headers={"authorization": auth} if auth else None
        )
    info = await model_info(model) if assembler.lmstudio_v0 and model else None
    return AssembledAnswer(assembler.result(prompt_tokens=prompt_tokens, model_info=info), prompt_source)


def _sent_document(request: httpx.Request) -> dict[str, Any]:
    """The JSON body lmgate sent upstream (the client's request, asking for a stream)."""
    try:
        document = json.loads(request.content)
    except (ValueError, UnicodeDecodeError):
        return {}
    return document if isinstance(document, dict) else {}


def _string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


#: ``finish_reason`` -> LM Studio's ``stats.stop_reason``. A stop string also ends with "stop";
#: the stream cannot tell it from the end-of-sequence token.
STOP_REASONS = {"stop": "eosFound", "length": "maxPredictedTokensReached", "tool_calls": "toolCalls"}
#: What ``/api/v0`` answers add to the OpenAI body, as they may appear in a stream's chunks.
_V0_FIELDS = ("stats", "model_info", "runtime")
KINDS = ("chat", "text", "v0-chat", "v0-text")


class CompletionAssembler:
    """Feeds on SSE text; ``result()`` returns the non-streaming body as a dict.

    ``kind`` is "chat" (``chat.completion``) or "text" (legacy ``text_completion``), prefixed
    "v0-" on LM Studio's ``/api/v0`` routes, whose whole answers differ (``stats``, ``model_info``,
    ``runtime``; no ``system_fingerprint``). ``clock`` times the stream from construction on:
    create the assembler when the upstream's headers arrive.
    """

    def __init__(
        self, kind: str, *, clock: Callable[[], float] = time.monotonic, max_frame_bytes: int = DEFAULT_FRAME_BYTES
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown completion kind {kind!r}")
        self.lmstudio_v0 = kind.startswith("v0-")
        self.kind = kind.removeprefix("v0-")
        self._clock = clock
        self._started_at = clock()
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._parser = FrameParser(max_frame_bytes)
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self._upstream_fields: dict[str, Any] = {}
        self._reasoning_frames = 0
        self._done = False
        self._closed = False

    def feed(self, text: str) -> None:
        for frame in self._parser.feed(text):
            self._take(frame)

    def close(self) -> None:
        """The stream ended: take what is buffered; raise if it was cut or carried no answer."""
        if self._closed:
            return
        for frame in self._parser.close():
            self._take(frame)
        if not self._done:
            raise StreamCut("The upstream stream ended before `data: [DONE]`; the answer is incomplete.")
        if not self._head:
            raise UpstreamProtocolError("The upstream stream carried no completion chunks.")
        self._closed = True

    @property
    def usage_missing(self) -> bool:
        """The upstream sent no usage: ``result`` needs the prompt's token count to make one."""
        return self._usage is None

    @property
    def model(self) -> str | None:
        model = self._head.get("model")
        return model if isinstance(model, str) else None

    @property
    def completion_tokens(self) -> int:
        """Tokens counted from the stream: one per frame carrying text, summed over choices."""
        return sum(state["tokens"] for state in self._choices.values())

    def result(self, *, prompt_tokens: int | None = None, model_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The whole answer. ``prompt_tokens`` completes a usage lmgate counts (the upstream sent
        none; without it the body has no ``usage``); ``model_info`` is what ``/api/v0`` reports."""
        self.close()
        body: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
            "choices": [self._choice(index) for index in sorted(self._choices)],
        }
        if self._usage is not None:
            body["usage"] = self._usage_with_details()
        elif prompt_tokens is not None:
            body["usage"] = self._counted_usage(prompt_tokens)
        if self.lmstudio_v0:
            body["stats"] = self._stats(body.get("usage"))
            info = self._upstream_fields.get("model_info") or (dict(model_info) if model_info else None)
            if info:
                body["model_info"] = info
            if self._upstream_fields.get("runtime"):
                body["runtime"] = self._upstream_fields["runtime"]
            return body
        body["stats"] = self._upstream_fields.get("stats") or {}
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
        for key in _V0_FIELDS:
            if isinstance(chunk.get(key), dict) and chunk[key]:
                self._upstream_fields[key] = chunk[key]
        tokens = 0
        for choice in chunk.get("choices") or ():
            tokens += self._merge_choice(choice)
        if tokens:
            now = self._clock()
            if self._first_token_at is None:
                self._first_token_at = now
            self._last_token_at = now

    def _merge_choice(self, choice: dict[str, Any]) -> int:
        """Merge one choice's piece; 1 if it carried text (a token, as the engines stream them)."""
        index = choice.get("index", 0)
        state = self._choices.setdefault(index, {"fields": {}, "tool_calls": {}, "finish_reason": None, "tokens": 0})
        if choice.get("finish_reason") is not None:
            state["finish_reason"] = choice["finish_reason"]
        if self.kind == "text":
            text = choice.get("text")
            if isinstance(text, str):
                state["fields"]["text"] = state["fields"].get("text", "") + text
            carried = isinstance(text, str) and text != ""
        else:
            carried = self._merge_delta(state, choice.get("delta") or {})
        state["tokens"] += carried
        return int(carried)

    def _merge_delta(self, state: dict[str, Any], delta: dict[str, Any]) -> bool:
        carried = False
        if delta.get("reasoning_content") or delta.get("reasoning"):
            self._reasoning_frames += 1
        for key, value in delta.items():
            if key == "tool_calls":
                for call in value or ():
                    carried = _merge_tool_call(state["tool_calls"], call) or carried
            elif key == "role":
                state["fields"].setdefault("role", value)
            elif isinstance(value, str):
                state["fields"][key] = state["fields"].get(key, "") + value
                carried = carried or value != ""
        return carried

    def _usage_with_details(self) -> Any:
        """LM Studio's non-streaming usage has ``completion_tokens_details``; its stream usage frame
        does not. It sends one token per delta frame, so the reasoning frames counted are the count."""
        usage = self._usage
        if self.kind != "chat" or self.lmstudio_v0 or not isinstance(usage, dict) or "completion_tokens_details" in usage:
            return usage
        detailed: dict[str, Any] = {}
        for key, value in usage.items():
            detailed[key] = value
            if key == "completion_tokens":
                detailed["completion_tokens_details"] = {"reasoning_tokens": self._reasoning_frames}
        return detailed

    def _counted_usage(self, prompt_tokens: int) -> dict[str, Any]:
        completion = self.completion_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        if self.kind == "chat" and not self.lmstudio_v0:
            usage["completion_tokens_details"] = {"reasoning_tokens": self._reasoning_frames}
        return usage

    def _stats(self, usage: Any) -> dict[str, Any]:
        """``/api/v0``'s stats: the upstream's where its stream carried them, else lmgate's timing.

        Time to first token runs from the upstream's headers (LM Studio sends them at once) to the
        first token; generation time from the first token to the last; tokens per second is the
        tokens after the first over that time (0 when there is no interval to measure).
        """
        end = self._last_token_at if self._last_token_at is not None else self._clock()
        first = self._first_token_at if self._first_token_at is not None else end
        generation_s = end - first
        tokens = self.completion_tokens
        finish = self._choices[min(self._choices)]["finish_reason"] if self._choices else None
        measured: dict[str, Any] = {
            "tokens_per_second": (tokens - 1) / generation_s if tokens > 1 and generation_s > 0 else 0.0,
            "time_to_first_token": round(first - self._started_at, 3),
            "generation_time": round(generation_s, 3),
            "stop_reason": STOP_REASONS.get(finish, finish) if isinstance(finish, str) else "eosFound",
        }
        upstream = self._upstream_fields.get("stats") or {}
        return {**measured, **upstream}

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
        tool_calls = [state["tool_calls"][i] for i in sorted(state["tool_calls"])]
        if self.lmstudio_v0:
            # /api/v0's message is role and content only; other fields only when they say something.
            message = {key: value for key, value in message.items() if key in ("role", "content") or value}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return {"index": index, "logprobs": None, "finish_reason": state["finish_reason"], "message": message}
        # LM Studio's /v1 non-streaming message always carries both, empty when unused.
        message.setdefault("reasoning_content", "")
        message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": None, "finish_reason": state["finish_reason"]}


def _merge_tool_call(calls: dict[int, dict[str, Any]], piece: dict[str, Any]) -> bool:
    """Tool calls stream as pieces: id, type and name first, then argument fragments.

    Returns whether the piece carried text (a name or arguments)."""
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
    return bool(function.get("name") or function.get("arguments"))


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
