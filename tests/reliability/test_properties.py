"""Property-based tests (hypothesis) for the two parsers lmgate relies on: SSE framing, which
decides whether a stream finished or was cut, and request validation, which decides what reaches
the upstream."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.proxy.sse import FrameParser, StreamMarkers
from gateway.request.validation import InvalidRequest, check_body

# Frame payloads as LM Studio writes them: one line of JSON-ish text, no blank lines inside.
payloads = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40)
frames = st.lists(st.tuples(st.sampled_from([None, "error", "message"]), payloads), max_size=12)


def render(events: list[tuple[str | None, str]], *, done: bool) -> bytes:
    out = ""
    for event, data in events:
        out += (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
    if done:
        out += "data: [DONE]\n\n"
    return out.encode()


def split(raw, cuts):  # bytes or str, cut at the given offsets
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in pairwise([0, *points, len(raw)])]


@settings(max_examples=300, deadline=None)
@given(events=frames, done=st.booleans(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_markers_see_done_and_error_whatever_the_chunking(events, done, cuts):
    raw = render(events, done=done)
    markers = StreamMarkers()
    for chunk in split(raw, cuts):
        markers.feed(chunk)
    assert markers.done == (b"data: [DONE]" in raw)
    assert markers.error == (b"event: error" in raw)


@settings(max_examples=300, deadline=None)
@given(events=frames, done=st.booleans(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_the_frame_parser_yields_the_same_frames_whatever_the_chunking(events, done, cuts):
    text = render(events, done=done).decode()
    parser = FrameParser()
    parsed: list[tuple[str | None, str]] = []
    for piece in split(text, cuts):  # the assembler decodes incrementally: characters, not bytes
        parsed += [(f.event, f.data) for f in parser.feed(piece)]
    parsed += [(f.event, f.data) for f in parser.close()]
    assert parsed == [*events, *([(None, "[DONE]")] if done else [])]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_validation_accepts_or_refuses_with_a_4xx_and_never_crashes(body):
    try:
        document = check_body(body)
    except InvalidRequest as error:
        assert 400 <= error.status < 500
        shape = error.to_dict()["error"]
        assert shape["code"] and shape["message"] and shape["type"] == "invalid_request_error"
        return
    assert isinstance(document, dict) and isinstance(document["model"], str) and document["model"]
    assert document.get("stream") in (None, True, False)


@settings(max_examples=200, deadline=None)
@given(
    model=st.text(min_size=1, max_size=30),
    stream=st.sampled_from([None, True, False]),
    extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("model", "stream")), json_values, max_size=4),
)
def test_every_well_formed_request_passes_unchanged(model, stream, extra):
    document = {"model": model, **extra, **({} if stream is None else {"stream": stream})}
    assert check_body(json.dumps(document).encode()) == document


@pytest.mark.parametrize("depth", [10, 10_000, 200_000])
def test_nesting_depth_is_a_400_not_a_crash(depth):
    body = b'{"model": "m", "x": ' + b"[" * depth + b"]" * depth + b"}"
    try:
        assert check_body(body)["model"] == "m"
    except InvalidRequest as error:
        assert error.status == 400
