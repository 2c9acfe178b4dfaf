"""gateway/proxy/sse.py: whole frames only on the relay (FrameHold), a frame bound, and linear work on a
hostile stream however it is chunked.

Linear work is checked by an operation count, not a clock: the bytes each scanner allocates while
it is fed (tracemalloc's peak per call). A scanner that re-copies what it holds on every chunk
allocates the square of the frame; a linear one a small multiple of the input.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterable
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy.sse import FrameHold, FrameParser, FrameTooLarge

MiB = 1024 * 1024


def allocated(calls: Iterable[Callable[[], object]]) -> int:
    """The bytes allocated while the calls ran, summed over the calls (each call's peak)."""
    total = 0
    tracemalloc.start()
    try:
        for call in calls:
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            call()
            total += tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return total


def one_line_frame(size: int) -> bytes:
    return b"data: " + b"x" * size + b"\n\n"


# --- linear work -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1024, 4096])
def test_the_frame_parser_does_linear_work_on_one_huge_frame(chunk):
    text = one_line_frame(MiB).decode()
    parser = FrameParser()
    frames: list[object] = []
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    work = allocated(lambda piece=piece: frames.extend(parser.feed(piece)) for piece in pieces)
    assert len(frames) == 1
    assert work < 8 * len(text), f"{work} bytes allocated to parse {len(text)}"  # quadratic: ~{len/chunk/2} x len


def test_the_frame_hold_does_linear_work_on_one_huge_frame():
    raw = one_line_frame(MiB)
    hold = FrameHold(limit=2 * MiB)
    out: list[bytes] = []
    pieces = [raw[i : i + 1024] for i in range(0, len(raw), 1024)]
    work = allocated(lambda piece=piece: out.append(hold.feed(piece)) for piece in pieces)
    assert b"".join(out) == raw and hold.pending == 0
    assert work < 8 * len(raw), f"{work} bytes allocated to pass {len(raw)}"


# --- the bound ----------------------------------------------------------------------------------


def test_a_frame_over_the_bound_is_refused_as_soon_as_it_is_that_long():
    parser = FrameParser(max_frame_chars=4096)
    hold = FrameHold(limit=4096)
    fed = 0
    with pytest.raises(FrameTooLarge, match=r"limits\.frame_bytes \(4096 bytes\)"):
        for _ in range(100):
            list(parser.feed("x" * 1000))
            fed += 1000
    assert fed == 4000
    with pytest.raises(FrameTooLarge):
        for _ in range(5):
            hold.feed(b"x" * 1000)


def test_frames_up_to_the_bound_pass():
    frame = one_line_frame(4000)
    assert [f.data for f in FrameParser(max_frame_chars=len(frame)).feed(frame.decode())] == ["x" * 4000]
    assert FrameHold(limit=len(frame)).feed(frame[:-1]) == b""


# --- whole frames only ----------------------------------------------------------------------------


def test_a_chunk_that_ends_a_frame_passes_as_it_came():
    chunk = b"data: {}\n\ndata: [DONE]\n\n"
    assert FrameHold().feed(chunk) is chunk


def test_the_held_part_goes_out_with_the_chunk_that_completes_it():
    hold = FrameHold()
    assert hold.feed(b"data: 1\n\ndata: 2") == b"data: 1\n\n"
    assert hold.pending == len(b"data: 2")
    assert hold.feed(b"2\n") == b""
    assert hold.feed(b"\ndata: 3\n\ndata") == b"data: 22\n\ndata: 3\n\n"
    assert hold.feed(b": 4\r\n\r\n") == b"data: 4\r\n\r\n" and hold.pending == 0


sse_texts = st.lists(
    st.tuples(st.sampled_from(["\n", "\r\n"]), st.text(alphabet="ab:{} ", max_size=12)), max_size=10
).map(lambda frames: "".join(f"data: {data}{eol}{eol}" for eol, data in frames))


@settings(max_examples=300, deadline=None)
@given(text=sse_texts, tail=st.text(alphabet="ab: \n", max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_the_hold_passes_every_whole_frame_and_only_whole_frames_whatever_the_chunking(text, tail, cuts):
    raw = (text + "data: " + tail.replace("\n\n", "\n")).encode()
    points = sorted({c % (len(raw) + 1) for c in cuts})
    hold = FrameHold()
    out = b""
    for a, b in pairwise([0, *points, len(raw)]):
        passed = hold.feed(raw[a:b])
        assert not passed or passed.endswith(b"\n\n") or passed.endswith(b"\r\n\r\n")
        out += passed
    assert out + raw[len(out):] == raw and len(raw) - len(out) == hold.pending
    assert out.startswith(text.encode())


@settings(max_examples=200, deadline=None)
@given(text=sse_texts, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_the_parser_is_not_fooled_by_a_crlf_split_across_pieces(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    parser = FrameParser()
    data = []
    for a, b in pairwise([0, *points, len(text)]):
        data += [frame.data for frame in parser.feed(text[a:b])]
    data += [frame.data for frame in parser.close()]
    assert data == [frame.data for frame in FrameParser().feed(text)]
