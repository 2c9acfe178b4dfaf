"""UsageTap: the usage frame found (and removed when lmgate asked for it) at any chunk split."""

from __future__ import annotations

import json

import pytest

from gateway.telemetry.record import RequestRecord
from gateway.telemetry.stream import UsageTap


def frame(document: object) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def token(text: str, finish: str | None = None) -> bytes:
    delta = {"content": text} if finish is None else {}
    return frame({"id": "c1", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
BODY = token("a") + token("usage") + token("b") + token("", finish="stop")
USAGE_FRAME = frame({"id": "c1", "model": "m", "choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"
STREAM = BODY + USAGE_FRAME + DONE


def tap(strip: bool = True) -> UsageTap:
    return UsageTap(RequestRecord(0.0, "/v1/chat/completions", "chat"), strip=strip)


def relay(usage_tap: UsageTap, chunks: list[bytes]) -> bytes:
    return b"".join(usage_tap.feed(chunk) for chunk in chunks) + usage_tap.close()


def test_the_usage_frame_is_removed_wherever_the_stream_is_split():
    for split in range(1, len(STREAM)):
        t = tap()
        assert relay(t, [STREAM[:split], STREAM[split:]]) == BODY + DONE, split
        assert t.record.usage == USAGE, split
    assert (t.record.tokens("prompt_tokens"), t.record.tokens("completion_tokens")) == (7, 3)


def test_one_byte_per_chunk_still_removes_it_whole():
    t = tap()
    assert relay(t, [STREAM[i : i + 1] for i in range(len(STREAM))]) == BODY + DONE
    assert t.record.usage == USAGE and t.record.response_id == "c1"


def test_a_client_that_asked_for_usage_gets_it_untouched():
    t = tap(strip=False)
    chunks = [BODY, USAGE_FRAME + DONE]
    assert [t.feed(chunk) for chunk in chunks] == chunks
    assert t.record.usage == USAGE


def test_chunks_before_the_answer_finished_pass_at_once_even_mid_frame():
    # The first byte must reach the client (and the timeout layer) when it arrives.
    t = tap()
    first = token("a")
    assert t.feed(first[:5]) == first[:5]
    assert t.feed(first[5:]) == first[5:]


@pytest.mark.parametrize(
    "chunk",
    [
        frame({"choices": [{"delta": {"content": "x"}}], "usage": None}),  # OpenAI-style "usage": null
        frame({"choices": [{"delta": {"content": '"usage": {'}}]}),  # the words in generated text
        frame({"choices": [{"delta": {}}], "usage": {"completion_tokens": 1}}),  # usage on a content chunk
    ],
)
def test_frames_that_only_look_like_usage_pass_and_count_nothing(chunk):
    t = tap()
    t.feed(token("", finish="stop"))  # from here on the tap looks for the usage frame
    assert t.feed(chunk) == chunk
    assert t.record.usage is None


@pytest.mark.parametrize(
    ("error_frame", "code"),
    [
        (b'event: error\ndata: {"error":"Model unloaded."}\n\n', "model_unloaded"),
        (
            b'event: error\ndata: {"error":{"message":"Input does not fit in context length."},"message":"x"}\n\n',
            "context_length_exceeded",
        ),
        (b'event: error\ndata: {"error":{"message":"m","type":"server_error","code":"stream_cut"}}\n\n', "stream_cut"),
    ],
)
def test_an_error_frame_that_ends_the_stream_is_recorded(error_frame, code):
    t = tap()
    assert relay(t, [token("a"), error_frame]) == token("a") + error_frame
    assert t.record.error_code == code


def spaced_frame(document: object) -> bytes:
    """As llama-cpp-python writes frames: ``json.dumps`` with its default spaces."""
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def chat_chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
    return {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


# A stream that never sends usage: one token per frame that carries text.
COUNTED_STREAM = (
    spaced_frame(chat_chunk({"role": "assistant"}))  # no text: not a token
    + spaced_frame(chat_chunk({"reasoning_content": "hm"}))
    + spaced_frame(chat_chunk({"content": 'say \\"content\\": \\"x'}))  # the key's words inside the text
    + spaced_frame(chat_chunk({"content": ""}))  # empty: not a token
    + spaced_frame(chat_chunk({"tool_calls": [{"index": 0, "id": "1", "type": "function",
                                               "function": {"name": "get", "arguments": ""}}]}))
    + spaced_frame(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
    + spaced_frame(chat_chunk({}, finish="tool_calls"))
    + DONE
)


def test_without_a_usage_frame_the_tokens_streamed_are_counted_at_any_split():
    for split in range(1, len(COUNTED_STREAM)):
        t = tap(strip=False)
        t.record.prompt_chars = 10
        assert relay(t, [COUNTED_STREAM[:split], COUNTED_STREAM[split:]]) == COUNTED_STREAM, split
        assert t.record.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, split
        assert t.record.usage_counted == {"input": "estimated", "output": "counted"}
    t = tap(strip=False)
    relay(t, [COUNTED_STREAM[i : i + 1] for i in range(len(COUNTED_STREAM))])
    assert t.tokens == 4


def test_an_upstream_usage_frame_wins_over_the_count():
    t = tap()
    relay(t, [STREAM])
    assert t.record.usage == USAGE and t.record.usage_counted is None and t.record.usage_source("input") == "upstream"
