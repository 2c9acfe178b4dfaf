"""The load generator: raw asyncio sockets, one process, one scenario per run.

    python -m bench.loadgen SCENARIO --url http://127.0.0.1:PORT [options]   -> JSON on stdout

Scenarios (see ``bench/README.md`` for what each one measures):

* ``requests``: a closed loop of non-streaming completions on ``--concurrency`` keep-alive
  connections (latency at 1, throughput at 64).
* ``stream``: the same loop with SSE answers of ``--chunks`` frames (time to first chunk, chunks/s).
* ``long``: ``--streams`` concurrent streams of ``--chunks`` frames ``--interval-ms`` apart,
  opened over ``--ramp-s`` (inter-chunk gaps, lost frames).
* ``cancel``: ``--streams`` long streams; once each has ``--leave-after`` frames, all clients close
  at once; the mock's own record (``--mock``) says when the upstream saw each close.

Nothing here is a framework: HTTP/1.1 requests are prebuilt bytes, responses are parsed just enough
to find their end and count SSE frames (``\\n\\n``), so the generator stays far from its ceiling
(``direct`` in the results is this generator against the mock with no proxy between).

Every stream of ``long`` and ``stream`` is classified (``streams_complete``, ``streams_refused``,
``streams_error_frame``, ``streams_truncated``; see ``classify``) so that overload shed honestly (a
503, an SSE error frame) is told apart from a stream that silently stopped short.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
from array import array
from collections.abc import Callable
from urllib.parse import urlsplit

from bench._loop import loop_name
from bench._loop import run as run_loop

_TERMINATOR = b"\r\n0\r\n\r\n"
_DONE = b"[DONE]"
# lmgate cuts a started stream with `event: error` + `data: {"error": ...}` (middleware.errors.sse_error_frame);
# the bare data line covers a proxy that sends only that.
_ERROR_EVENT = b"event: error"
_ERROR_DATA = b'data: {"error"'
# Bytes of the previous read kept so a marker split over two reads is still found.
_CARRY = max(len(_DONE), len(_ERROR_EVENT), len(_ERROR_DATA)) - 1
STREAM_CLASSES = ("complete", "refused", "error_frame", "truncated")
# Sent on every request; the LiteLLM leg is started with it as its master key (local only, no secret).
BENCH_KEY = "sk-lmgate-bench-4f1c9a7e2b6d8053a1e4c7f9b2d6e8a0"


def build_request(host: str, port: int, *, stream: bool, chunks: int = 0, interval_ms: float = 0, cid: str = "") -> bytes:
    script = f"bench:chunks={chunks};interval_ms={interval_ms:g};cid={cid}" if stream else "bench:cid=" + cid
    document = {
        "model": "bench",
        "messages": [{"role": "user", "content": script}],
        "max_tokens": 256,
        "stream": stream,
    }
    body = json.dumps(document, separators=(",", ":")).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %s\r\naccept: */*\r\ncontent-length: %d\r\n\r\n%s"
        % (host.encode(), port, BENCH_KEY.encode(), len(body), body)
    )


class Response:
    """What one exchange saw; times are ``time.monotonic()``."""

    __slots__ = ("sent_at", "first_frame_at", "last_frame_at", "done_at", "status", "frames", "complete",
                 "done_seen", "error_frame")

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at
        self.first_frame_at = 0.0
        self.last_frame_at = 0.0
        self.done_at = 0.0
        self.status = 0
        self.frames = 0
        self.complete = False  # the body ended as HTTP framing says (not a dropped connection)
        self.done_seen = False  # `data: [DONE]` was received
        self.error_frame = False  # an SSE error frame was received


def classify(response: Response | None, chunks: int) -> str:
    """One stream's fate, one of ``STREAM_CLASSES``.

    ``complete``: HTTP 200, every frame and `data: [DONE]`. ``refused``: an HTTP error status (overload
    shed with a 503, say). ``error_frame``: a 200 stream that carried an SSE error frame (a stream cut
    announced to the client). ``truncated``: anything else, a stream that stopped short with no word
    of why, including connection errors and timeouts (``None``: no response at all).
    """
    if response is None:
        return "truncated"
    if response.status >= 400:
        return "refused"
    if response.error_frame:
        return "error_frame"
    if response.status == 200 and response.done_seen and response.frames >= chunks:
        return "complete"
    return "truncated"


def stream_counts(fates: list[str]) -> dict[str, int]:
    return {f"streams_{name}": fates.count(name) for name in STREAM_CLASSES}


class Client(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` sends a request and resolves with its Response.

    ``on_frames(response, n, now)`` is called for every read that brings ``n`` new SSE frames.
    """

    def __init__(self, on_frames: Callable[[Response, int, float], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_frames = on_frames
        self.response: Response | None = None
        self.future: asyncio.Future[Response] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.head = b""
        self.in_body = False
        self.mode = ""
        self.remaining = 0
        self.tail = b"\r\n"
        self.last_byte = 0
        self.carry = b""
        self.must_close = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.mode == "close" and self.response is not None:
            self._finish(time.monotonic())
        elif self.future is not None and not self.future.done():
            self.future.set_exception(ConnectionError("connection closed mid-response"))

    def exchange(self, request: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._reset()
        self.response = Response(time.monotonic())
        self.future = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.future

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        response = self.response
        if response is None:
            return
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4:]
            self.head = b""
            self.in_body = True
            lines = head.split(b"\r\n")
            response.status = int(lines[0].split(b" ", 2)[1])
            self.mode = "close"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.mode, self.remaining = "length", int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.mode = "chunked"
                elif name == b"connection" and b"close" in value.lower():
                    # hypercorn ends a keep-alive connection after 1,000 requests (keep_alive_max_requests)
                    self.must_close = True
            if self.mode == "length" and self.remaining == 0:
                self._finish(now)
                return
            if not data:
                return
        frames = data.count(b"\n\n")
        if self.last_byte == 10 and data[0] == 10:
            frames += 1
        self.last_byte = data[-1]
        # Substring searches in C on each read, plus the seam with the previous read: cheap at 1,000 streams.
        joint = self.carry + data[:_CARRY]
        if not response.done_seen and (_DONE in data or _DONE in joint):
            response.done_seen = True
        if not response.error_frame and (_ERROR_EVENT in data or _ERROR_DATA in data
                                         or _ERROR_EVENT in joint or _ERROR_DATA in joint):
            response.error_frame = True
        self.carry = data[-_CARRY:] if len(data) >= _CARRY else (self.carry + data)[-_CARRY:]
        if frames:
            if not response.frames:
                response.first_frame_at = now
            response.frames += frames
            response.last_frame_at = now
            if self.on_frames is not None:
                self.on_frames(response, frames, now)
        if self.mode == "length":
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._finish(now)
        elif self.mode == "chunked":
            self.tail = (self.tail + data)[-7:] if len(data) < 7 else data[-7:]
            if self.tail == _TERMINATOR:
                self._finish(now)

    def _finish(self, now: float) -> None:
        response = self.response
        if response is None:
            return
        response.done_at = now
        response.complete = True
        self.response = None
        if self.must_close and self.transport is not None:
            self.transport.close()  # the closed loop sees is_closing() and reconnects
        if self.future is not None and not self.future.done():
            self.future.set_result(response)


async def connect(host: str, port: int, on_frames: Callable[[Response, int, float], None] | None = None) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: Client(on_frames), host, port)
    return client


def percentiles(values: list[float] | array[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of ``values`` times ``scale`` (seconds to ms by default)."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered: list[float] = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * scale

    return {"n": n, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1] * scale,
            "mean": sum(ordered) / n * scale}


# -- scenarios ---------------------------------------------------------------------------------


async def closed_loop(args: argparse.Namespace, host: str, port: int, *, stream: bool) -> dict[str, object]:
    """``concurrency`` workers, each on its own keep-alive connection, one exchange after another."""
    request = build_request(host, port, stream=stream, chunks=args.chunks)
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + args.warmup_s
    stop_at = measure_from + args.duration_s
    latencies: list[float] = []
    ttfcs: list[float] = []
    frames = 0
    errors: dict[str, int] = {}
    completed = 0
    window_end = [0.0]
    fates: list[str] = []

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def worker() -> None:
        nonlocal frames, completed
        client: Client | None = None
        while loop.time() < stop_at and (not args.requests or completed < args.requests):
            attempt: Response | None = None
            try:
                if client is None or client.transport is None or client.transport.is_closing():
                    client = await connect(host, port)
                exchange = client.exchange(request)
                attempt = client.response
                response = await asyncio.wait_for(exchange, args.timeout_s)
            except (TimeoutError, OSError) as exc:
                error(type(exc).__name__)
                if stream and (attempt is None or attempt.sent_at >= measure_from):
                    fates.append(classify(attempt, args.chunks))
                if client is not None and client.transport is not None:
                    client.transport.abort()
                client = None
                await asyncio.sleep(0.01)
                continue
            if response.sent_at < measure_from:
                continue
            if stream:
                fates.append(classify(response, args.chunks))
            if response.status != 200:
                error(f"http_{response.status}")
                continue
            if stream and response.frames < args.chunks:
                error("short_stream")
            completed += 1
            window_end[0] = max(window_end[0], response.done_at)
            latencies.append(response.done_at - response.sent_at)
            if stream:
                frames += min(response.frames, args.chunks)
                ttfcs.append(response.first_frame_at - response.sent_at)
        if client is not None and client.transport is not None:
            client.transport.close()

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = max(1e-9, (min(window_end[0], stop_at) if args.requests else stop_at) - measure_from)
    result: dict[str, object] = {
        "completed": completed,
        "elapsed_s": elapsed,
        "rps": completed / elapsed,
        "latency_ms": percentiles(latencies),
        "errors": errors,
    }
    if stream:
        result["chunks_per_s"] = frames / elapsed
        result["ttfc_ms"] = percentiles(ttfcs)
        result["stream_chunks_per_s"] = percentiles(
            [args.chunks / lat for lat in latencies if lat > 0], scale=1.0
        )
        result.update(stream_counts(fates))
    return result


async def long_streams(args: argparse.Namespace, host: str, port: int) -> dict[str, object]:
    """``streams`` concurrent paced streams; every gap between two content frames is kept."""
    gaps = array("d")
    chunks = args.chunks
    seen: dict[int, int] = {}
    interval_s = args.interval_ms / 1000

    # Client updates last_frame_at after calling on_frames: keep the previous arrival here.
    previous: dict[int, float] = {}

    def on_frames_timed(response: Response, n: int, now: float) -> None:
        key = id(response)
        index = seen.get(key, 0)
        last = previous.get(key, now)
        for i in range(n):
            index += 1
            if 2 <= index <= chunks:
                gaps.append(now - last if i == 0 else 0.0)
        seen[key] = index
        previous[key] = now

    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.ramp_s + chunks * interval_s + args.timeout_s
    errors: dict[str, int] = {}
    results: list[Response] = []
    clients: list[Client] = []
    fates: list[str] = []

    async def one(i: int) -> None:
        await asyncio.sleep(args.ramp_s * i / args.streams)
        request = build_request(host, port, stream=True, chunks=chunks, interval_ms=args.interval_ms, cid=str(i))
        response: Response | None = None
        try:
            client = await asyncio.wait_for(connect(host, port, on_frames_timed), args.timeout_s)
            clients.append(client)
            exchange = client.exchange(request)
            response = client.response  # kept: what arrived before a close or timeout still classifies it
            response = await asyncio.wait_for(exchange, max(0.1, deadline - loop.time()))
        except (TimeoutError, OSError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        else:
            results.append(response)
        fates.append(classify(response, chunks))

    await asyncio.gather(*(one(i) for i in range(args.streams)))
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    complete = [r for r in results if r.complete and r.status == 200 and r.frames >= chunks]
    content_frames = sum(min(index, chunks) for index in seen.values())
    expected = args.streams * chunks
    ttfcs = [r.first_frame_at - r.sent_at for r in results if r.frames]
    return {
        "streams": args.streams,
        "complete_streams": len(complete),
        "frames_received": content_frames,
        "frames_expected": expected,
        "lost_frames": expected - content_frames,
        "gap_ms": percentiles(gaps),
        "gaps_over_interval_plus_5ms": sum(1 for g in gaps if g > interval_s + 0.005),
        "ttfc_ms": percentiles(ttfcs),
        **stream_counts(fates),
        "errors": errors,
    }


async def cancel_storm(args: argparse.Namespace, host: str, port: int) -> dict[str, object]:
    """``streams`` clients stream; once all have ``leave_after`` frames (or ``gather_s`` passed)
    every client closes in the same loop iteration; the mock's record gives each cancel's arrival."""
    mock = urlsplit(args.mock)
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    have_enough: set[int] = set()
    clients: dict[str, Client] = {}
    errors: dict[str, int] = {}

    def on_frames(response: Response, n: int, now: float) -> None:
        if response.frames + n >= args.leave_after and id(response) not in have_enough:
            have_enough.add(id(response))
            if len(have_enough) >= args.streams:
                ready.set()

    async def one(i: int) -> None:
        await asyncio.sleep(args.ramp_s * i / args.streams)
        cid = f"c{i}"
        request = build_request(host, port, stream=True, chunks=args.chunks, interval_ms=args.interval_ms, cid=cid)
        try:
            client = await asyncio.wait_for(connect(host, port, on_frames), args.timeout_s)
        except (TimeoutError, OSError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        clients[cid] = client
        client.exchange(request).add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    await asyncio.gather(*(one(i) for i in range(args.streams)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ready.wait(), args.gather_s)
    streaming = len(have_enough)
    closed_at: dict[str, float] = {}
    for cid, client in clients.items():
        if client.transport is not None and not client.transport.is_closing():
            closed_at[cid] = time.monotonic()
            client.transport.close()
    # Wait for the upstream to see them, then a settle period for anything left over.
    settle_until = loop.time() + args.settle_s
    stats: dict[str, object] = {}
    while loop.time() < settle_until:
        await asyncio.sleep(0.05)
        stats = await mock_stats(mock.hostname or "127.0.0.1", mock.port or 80)
        if stats["streams_active"] == 0:
            break
    await asyncio.sleep(args.linger_s)
    stats = await mock_stats(mock.hostname or "127.0.0.1", mock.port or 80)
    seen: dict[str, float] = stats["cancels"]  # type: ignore[assignment]
    started: dict[str, float] = stats["started"]  # type: ignore[assignment]
    finished: dict[str, float] = stats["finished"]  # type: ignore[assignment]
    # A cancel is owed for every stream the upstream had started and not yet finished when its
    # client closed; one that reached the upstream only later is "late start", also owed a cancel.
    owed = [cid for cid in closed_at if not (cid in finished and finished[cid] <= closed_at[cid])]
    delays = [seen[cid] - closed_at[cid] for cid in owed if cid in seen]
    within = sum(1 for d in delays if d <= args.cancel_target_ms / 1000)
    return {
        "streams": args.streams,
        "streaming_when_closed": streaming,
        "closed": len(closed_at),
        "upstream_started": sum(1 for cid in closed_at if cid in started),
        "finished_before_close": len(closed_at) - len(owed),
        "cancels_owed": len(owed),
        "cancels_seen": len(delays),
        "cancels_missing": len(owed) - len(delays),
        "cancel_ms": percentiles(delays),
        "within_target": within,
        "target_ms": args.cancel_target_ms,
        "left_over_streams": stats["streams_active"],
        "upstream_conns_open": stats["conns_open"],
        "errors": errors,
    }


async def mock_stats(host: str, port: int) -> dict[str, object]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /_bench/stats HTTP/1.1\r\nhost: mock\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        stats: dict[str, object] = json.loads(await reader.readexactly(length))
        return stats
    finally:
        writer.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("scenario", choices=["requests", "stream", "long", "cancel"])
    parser.add_argument("--url", required=True, help="where to send requests (a proxy, or the mock)")
    parser.add_argument("--mock", help="the mock's URL (cancel: read its record of cancels)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=0, help="stop after this many (0: duration only)")
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--ramp-s", type=float, default=1.0)
    parser.add_argument("--leave-after", type=int, default=10)
    parser.add_argument("--gather-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--linger-s", type=float, default=0.5)
    parser.add_argument("--cancel-target-ms", type=float, default=250.0)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, object]:
    target = urlsplit(args.url)
    host, port = target.hostname or "127.0.0.1", target.port or 80
    if args.scenario == "requests":
        result = await closed_loop(args, host, port, stream=False)
    elif args.scenario == "stream":
        result = await closed_loop(args, host, port, stream=True)
    elif args.scenario == "long":
        result = await long_streams(args, host, port)
    else:
        result = await cancel_storm(args, host, port)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    result = run_loop(run(args), args.loop)
    result["loop"] = loop_name(args.loop)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["generator_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["generator_wall_s"] = time.monotonic() - started
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
