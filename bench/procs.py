"""Processes of a bench run: CPU placement, start/stop, and what /proc says about them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Placement:
    """Which CPUs the proxy under test and the harness (mock + generator) run on."""

    proxy: tuple[int, ...] | None
    harness: tuple[int, ...] | None
    note: str


def plan_placement() -> Placement:
    """The proxy alone on the second CPU; the mock and the generator on all the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Placement(None, None, f"{len(cpus)} CPU: no pinning; proxy and harness share it")
    proxy = (cpus[1],)
    harness = tuple(c for c in cpus if c != cpus[1])
    note = f"proxy pinned to CPU {cpus[1]}; mock + load generator pinned to CPU {','.join(map(str, harness))}"
    if len(cpus) == 2:
        note += " (2 CPUs only: mock and generator share one core)"
    return Placement(proxy, harness, note)


def raise_nofile() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s:g} s")


def wait_line(path: Path, pattern: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> re.Match[str]:
    """The first match of ``pattern`` in the file ``path`` (a process's output), waiting for it."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = regex.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; its output:\n{text[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"no line matching {pattern!r} in {path} after {timeout_s:g} s")


class Process:
    """A child in its own session (so its whole group can be ended), pinned to ``cpus``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: Sequence[int] | None,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.out = log_dir / f"{name}.out"
        self.err = log_dir / f"{name}.err"
        cpu_set = set(cpus) if cpus else None

        def pin() -> None:
            if cpu_set:
                os.sched_setaffinity(0, cpu_set)

        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen(
                list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                preexec_fn=pin, start_new_session=True,
            )
        self.pid = self.popen.pid

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM to the process group this child leads, then SIGKILL after ``timeout_s``."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # stragglers in the group (nginx/litellm workers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout_s)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def tree_pids(pid: int) -> list[int]:
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, ()))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of ``pids`` (plus their waited-for children), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _TICK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except OSError:
            continue
    return total


def open_sockets(pids: Sequence[int]) -> int:
    count = 0
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        count += 1
                except OSError:
                    continue
        except OSError:
            continue
    return count


def cpu_busy() -> dict[int, float]:
    """Busy seconds per CPU since boot (everything but idle and iowait)."""
    busy: dict[int, float] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values]
                busy[int(name[3:])] = (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK
    return busy


class Sampler:
    """Samples the RSS of a process tree every ``period_s`` on a thread; ``peak`` is the most seen."""

    def __init__(self, pid: int | None, period_s: float = 0.05) -> None:
        self.pid = pid
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        pids = tree_pids(self.pid) if self.pid else []
        refreshed = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 1.0:
                pids, refreshed = tree_pids(self.pid), time.monotonic()  # type: ignore[arg-type]
            self.peak = max(self.peak, rss_bytes(pids))
            self._stop.wait(self.period_s)
