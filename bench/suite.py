"""One bench run: the mock, every leg, every scenario, interleaved round by round.

Within a round every leg runs each scenario before the next scenario starts, and the order of the
legs rotates from round to round, so a drift in the machine's load touches every leg alike. All
proxies of a round are started fresh at its beginning and stopped at its end (in ``finally``).
Before each measurement the mock is quiet (no stream left from the last one) and its counters reset.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.legs import Leg
from bench.procs import Placement, Process, Sampler, cpu_busy, cpu_seconds, open_sockets, tree_pids, wait_line


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    args: tuple[str, ...]
    timeout_s: float


def scenarios(quick: bool) -> list[Scenario]:
    """The scenarios of issues 9 and 17; ``quick`` is a tiny version that only checks the suite works."""
    if quick:
        return [
            Scenario("latency_c1", "Non-streaming, concurrency 1", ("requests", "--concurrency", "1", "--duration-s", "0.2", "--warmup-s", "0.05"), 30),
            Scenario("throughput_c64", "Non-streaming, concurrency 64", ("requests", "--concurrency", "8", "--duration-s", "0.2", "--warmup-s", "0.05"), 30),
            Scenario("stream_c1", "Streaming 50 chunks, concurrency 1", ("stream", "--concurrency", "1", "--chunks", "10", "--duration-s", "0.2", "--warmup-s", "0.05"), 30),
            Scenario("stream_c64", "Streaming 50 chunks, concurrency 64", ("stream", "--concurrency", "8", "--chunks", "10", "--duration-s", "0.2", "--warmup-s", "0.05"), 30),
            Scenario("long_256", "256 live streams, 200 chunks 20 ms apart", ("long", "--streams", "10", "--chunks", "10", "--interval-ms", "10", "--ramp-s", "0.05"), 30),
            Scenario("long_1000", "1,000 live streams, 200 chunks 20 ms apart", ("long", "--streams", "20", "--chunks", "10", "--interval-ms", "10", "--ramp-s", "0.05"), 30),
            Scenario("long_100", "100 live streams, 200 chunks 20 ms apart", ("long", "--streams", "5", "--chunks", "10", "--interval-ms", "10", "--ramp-s", "0.05"), 30),
            Scenario("cancel_500", "Cancel storm, 500 clients", ("cancel", "--streams", "10", "--chunks", "200", "--interval-ms", "10", "--leave-after", "3", "--ramp-s", "0.1", "--settle-s", "5", "--linger-s", "0.1"), 30),
        ]
    return [
        Scenario("latency_c1", "Non-streaming, concurrency 1", ("requests", "--concurrency", "1", "--duration-s", "4", "--warmup-s", "0.5"), 60),
        Scenario("throughput_c64", "Non-streaming, concurrency 64", ("requests", "--concurrency", "64", "--duration-s", "5", "--warmup-s", "1"), 60),
        Scenario("stream_c1", "Streaming 50 chunks, concurrency 1", ("stream", "--concurrency", "1", "--chunks", "50", "--duration-s", "4", "--warmup-s", "0.5"), 60),
        Scenario("stream_c64", "Streaming 50 chunks, concurrency 64", ("stream", "--concurrency", "64", "--chunks", "50", "--duration-s", "5", "--warmup-s", "1"), 60),
        Scenario("long_256", "256 live streams, 200 chunks 20 ms apart", ("long", "--streams", "256", "--chunks", "200", "--interval-ms", "20", "--ramp-s", "0.5"), 120),
        Scenario("long_1000", "1,000 live streams, 200 chunks 20 ms apart", ("long", "--streams", "1000", "--chunks", "200", "--interval-ms", "20", "--ramp-s", "1"), 120),
        Scenario("long_100", "100 live streams, 200 chunks 20 ms apart", ("long", "--streams", "100", "--chunks", "200", "--interval-ms", "20", "--ramp-s", "0.5"), 120),
        Scenario("cancel_500", "Cancel storm, 500 clients", ("cancel", "--streams", "500", "--chunks", "1500", "--interval-ms", "20", "--leave-after", "10", "--ramp-s", "0.5", "--settle-s", "3", "--linger-s", "0.5", "--gather-s", "20"), 120),
    ]


@dataclass
class Run:
    """Everything one bench run measured; ``results[scenario][leg]`` is a list, one per round."""

    placement: Placement
    rounds: int
    legs: list[str]
    skipped: dict[str, str]
    versions: dict[str, str]
    scenarios: list[Scenario]
    harness_loop: str = ""
    quick: bool = False
    results: dict[str, dict[str, list[dict[str, object]]]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float = 0.0


def _http(method: str, url: str, attempts: int = 3) -> dict[str, object]:
    """A control request to the mock (on 127.0.0.1); it may be slow while a proxy still drains a backlog."""
    for attempt in range(attempts):
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


class Mock:
    def __init__(self, placement: Placement, work: Path, loop: str) -> None:
        self.process = Process(
            "mock", [sys.executable, "-m", "bench.mock", "--port", "0", "--loop", loop],
            cpus=placement.harness, log_dir=work, cwd=str(Path(__file__).resolve().parent.parent),
        )
        self.url = wait_line(self.process.out, r"mock listening on (http://\S+)", 15, self.process.popen).group(1)

    def quiet(self, timeout_s: float = 5.0) -> dict[str, object]:
        """Wait until no stream is active, end those a leg never cancelled, then reset the counters."""
        deadline = time.monotonic() + timeout_s
        stats = _http("GET", self.url + "/_bench/stats")
        while stats["streams_active"] and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = _http("GET", self.url + "/_bench/stats")
        if stats["streams_active"]:
            _http("POST", self.url + "/_bench/abort")
        _http("POST", self.url + "/_bench/reset")
        return stats

    def stats(self) -> dict[str, object]:
        return _http("GET", self.url + "/_bench/stats")

    def stop(self) -> None:
        self.process.stop()


def measure(leg: Leg, scenario: Scenario, mock: Mock, placement: Placement, loop: str) -> dict[str, object]:
    """One scenario against one leg, with the proxy's CPU, RSS and sockets and the cores' load."""
    leftover = mock.quiet()
    proxy = tree_pids(leg.pid) if leg.pid else []
    argv = [sys.executable, "-m", "bench.loadgen", *scenario.args, "--url", leg.url, "--mock", mock.url, "--loop", loop]
    busy0, proxy0, mock0, wall0 = cpu_busy(), cpu_seconds(proxy), cpu_seconds([mock.process.pid]), time.monotonic()
    with Sampler(leg.pid) as rss:
        completed = subprocess.run(
            argv, capture_output=True, text=True, timeout=scenario.timeout_s,
            preexec_fn=(lambda: __import__("os").sched_setaffinity(0, set(placement.harness))) if placement.harness else None,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
    wall = time.monotonic() - wall0
    busy1 = cpu_busy()
    proxy = tree_pids(leg.pid) if leg.pid else []
    proxy_cpu = cpu_seconds(proxy) - proxy0
    mock_cpu = cpu_seconds([mock.process.pid]) - mock0
    if completed.returncode != 0:
        raise RuntimeError(f"load generator failed on {leg.name}/{scenario.name}:\n{completed.stderr[-3000:]}")
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    generator_cpu = float(result.pop("generator_cpu_s"))  # type: ignore[arg-type]
    result.pop("generator_wall_s", None)
    result.pop("loop", None)
    total_busy = sum(busy1.values()) - sum(busy0.values())
    result["wall_s"] = wall
    result["proxy_cpu_s"] = proxy_cpu if leg.pid else None
    result["proxy_rss_peak_mb"] = rss.peak / 2**20 if leg.pid else None
    result["proxy_sockets_after"] = open_sockets(proxy) if leg.pid else None
    result["harness_cpu_s"] = mock_cpu + generator_cpu
    result["harness_busy"] = (mock_cpu + generator_cpu) / wall
    result["proxy_busy"] = proxy_cpu / wall if leg.pid else None
    # CPU that none of our processes used: other people's work on this machine, in cores.
    result["foreign_cores"] = max(0.0, total_busy - proxy_cpu - mock_cpu - generator_cpu) / wall
    result["mock_before"] = {"streams_active": leftover["streams_active"]}
    frames = result.get("frames_received")
    if isinstance(frames, int) and frames and leg.pid:
        result["proxy_cpu_us_per_chunk"] = proxy_cpu / frames * 1e6
    completed_requests = result.get("completed")
    if isinstance(completed_requests, int) and completed_requests and leg.pid:
        result["proxy_cpu_us_per_request"] = proxy_cpu / max(1, completed_requests) * 1e6
    return result


def run_suite(
    legs: list[Leg],
    run: Run,
    *,
    work: Path | None = None,
    log: Callable[[str], None] = print,
) -> Run:
    placement = run.placement
    with tempfile.TemporaryDirectory(prefix="lmgate-bench-") as tmp:
        base = work or Path(tmp)
        mock = Mock(placement, base, run.harness_loop)
        try:
            for round_index in range(run.rounds):
                order = legs[round_index % len(legs):] + legs[:round_index % len(legs)]
                round_dir = base / f"round{round_index + 1}"
                round_dir.mkdir(parents=True, exist_ok=True)
                started: list[Leg] = []
                try:
                    for leg in order:
                        leg.start(mock.url, round_dir, placement.proxy)
                        started.append(leg)
                    if not run.quick:
                        warm_up(started, mock, placement, run.harness_loop)
                    for scenario in run.scenarios:
                        for leg in order:
                            log(f"round {round_index + 1}/{run.rounds}  {scenario.name:<15} {leg.name:<11} ...")
                            try:
                                result = measure(leg, scenario, mock, placement, run.harness_loop)
                            except Exception as exc:  # one failed measurement must not lose the run
                                result = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
                                log(f"    FAILED: {result['failed']}")
                            else:
                                log("    " + summary_line(scenario.name, result))
                            run.results.setdefault(scenario.name, {}).setdefault(leg.name, []).append(result)
                finally:
                    for leg in started:
                        leg.stop()
        finally:
            mock.stop()
    run.finished = time.time()
    return run


def warm_up(legs: list[Leg], mock: Mock, placement: Placement, loop: str) -> None:
    """A few requests through each leg so imports, pools and caches are warm before measuring."""
    for leg in legs:
        for kind in ("requests", "stream"):
            subprocess.run(
                [sys.executable, "-m", "bench.loadgen", kind, "--url", leg.url, "--concurrency", "4",
                 "--duration-s", "0.3", "--warmup-s", "0", "--chunks", "5", "--loop", loop],
                capture_output=True, timeout=60, cwd=str(Path(__file__).resolve().parent.parent),
            )
    mock.quiet()


def fates(r: dict[str, object]) -> str:
    """The streams' classification (bench.loadgen.classify), e.g. ``streams 250 ok/0 refused/6 error frame/0 truncated``."""
    return "streams " + "/".join(f"{r.get('streams_' + key, '-')} {label}" for key, label in (
        ("complete", "ok"), ("refused", "refused"), ("error_frame", "error frame"), ("truncated", "truncated")))


def summary_line(scenario: str, r: dict[str, object]) -> str:
    def f(value: object, fmt: str = "{:.2f}") -> str:
        return "-" if value is None else fmt.format(value)

    busy = f"proxy {f(r.get('proxy_busy'), '{:.0%}')} harness {f(r.get('harness_busy'), '{:.0%}')} foreign {f(r.get('foreign_cores'), '{:.2f}')}"
    if scenario.startswith(("latency", "throughput")):
        lat = r["latency_ms"]  # type: ignore[index]
        return f"{f(r['rps'], '{:.0f}')} req/s  p50 {f(lat['p50'], '{:.3f}')} ms  p99 {f(lat['p99'], '{:.3f}')} ms  errors {r['errors']}  {busy}"  # type: ignore[index]
    if scenario.startswith("stream"):
        ttfc = r["ttfc_ms"]  # type: ignore[index]
        return f"{f(r['chunks_per_s'], '{:.0f}')} chunks/s  ttfc p50 {f(ttfc['p50'], '{:.3f}')} ms  {fates(r)}  errors {r['errors']}  {busy}"  # type: ignore[index]
    if scenario.startswith("long"):
        gap = r["gap_ms"]  # type: ignore[index]
        return (f"gap p50 {f(gap['p50'])} p99 {f(gap['p99'])} max {f(gap['max'])} ms  lost {r['lost_frames']}  "  # type: ignore[index]
                f"{fates(r)}  cpu/chunk {f(r.get('proxy_cpu_us_per_chunk'), '{:.1f}')} us  "
                f"rss {f(r.get('proxy_rss_peak_mb'), '{:.0f}')} MB  {busy}")
    cancel = r["cancel_ms"]  # type: ignore[index]
    return (f"seen {r['cancels_seen']}/{r['closed']}  p50 {f(cancel['p50'])} p99 {f(cancel['p99'])} max {f(cancel['max'])} ms  "  # type: ignore[index]
            f"left over {r['left_over_streams']}  {busy}")
