"""The deployment harness: real NGINX (Debian's package) in front of lmgate, on free 127.0.0.1 ports.

The sample configs in ``deploy/nginx/`` are what users copy, so the tests run *those files*: each is
rendered by replacing only its documented defaults (``listen 80;``, lmgate at ``127.0.0.1:8080``,
the replicas at ``:8081``/``:8082``, the log path, the site root) and included in a minimal main
config whose pid file, logs and temp paths live in the test's temp directory. NGINX runs as a
foreground child (``daemon off``), lmgate either in-process (``serve_in_background``) or as a real
``python -m gateway serve`` process when a test must send it SIGTERM.

Fixtures hand out *factories of async context managers*, used as ``async with nginx(...) as proxy``
inside the test, so every process and server is started and stopped in the test's own task and
always ends in a ``finally``. Waiting for an external process to come up is a bounded poll; test
logic itself synchronises on events (the scripted upstream, the simulator's counters).

Without an ``nginx`` binary the tests skip, unless ``CI`` or ``LMGATE_REQUIRE_NGINX`` is set, where
a missing NGINX is a failure: the proof must not vanish silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from anyio.abc import Process

REPO = Path(__file__).resolve().parents[2]
SAMPLES_DIR = REPO / "deploy" / "nginx"
# Every sample file is tested; a new one fails here until the maps below describe it.
SAMPLES = tuple(sorted(path.name for path in SAMPLES_DIR.glob("*.conf")))
# Where each sample mounts lmgate on the public side.
PREFIX = {"single.conf": "", "replicas.conf": "", "subpath.conf": "/llm"}
# The lmgate addresses each sample uses, as documented in it.
LMGATE_ADDRESSES = {
    "single.conf": ("127.0.0.1:8080",),
    "replicas.conf": ("127.0.0.1:8081", "127.0.0.1:8082"),
    "subpath.conf": ("127.0.0.1:8080",),
}
SHIPPED_READ_TIMEOUT = "proxy_read_timeout 300s;"
ACCESS_LOG = "/var/log/nginx/lmgate.access.log"
SITE_ROOT = "root /var/www/html;"

_START_TIMEOUT_S = 20.0  # a loaded CI machine can take seconds to start Python
_STOP_TIMEOUT_S = 5.0
_POLL_S = 0.02
_PORT_ATTEMPTS = 3


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None
    )


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    binary = nginx_binary()
    if binary is None:
        reason = "nginx is not installed (CI installs it: apt-get install -y nginx)"
        if os.environ.get("CI") or os.environ.get("LMGATE_REQUIRE_NGINX"):
            pytest.fail(reason + "; CI/LMGATE_REQUIRE_NGINX is set, so it is required", pytrace=False)
        pytest.skip(reason)
    return binary


# --- rendering ------------------------------------------------------------------------------------


def replace_documented(text: str, old: str, new: str, *, sample: str) -> str:
    """Replace every ``old`` with ``new``; a sample that no longer contains ``old`` is an error."""
    if old not in text:
        raise AssertionError(f"{sample} no longer contains {old!r}; update the harness and the docs")
    return text.replace(old, new)


def render_sample(
    sample: str,
    *,
    listen_port: int,
    lmgate_ports: Sequence[int],
    log_dir: Path,
    site_root: Path | None = None,
    read_timeout: str | None = None,
    edits: Mapping[str, str] | None = None,
) -> str:
    """The sample as a user would deploy it, with test ports and paths instead of the defaults.

    ``read_timeout`` replaces the shipped ``proxy_read_timeout 300s;``; ``edits`` are further
    ``{old: new}`` replacements, for tests that show what a *wrong* setting does.
    """
    text = (SAMPLES_DIR / sample).read_text(encoding="utf-8")
    addresses = LMGATE_ADDRESSES[sample]
    if len(lmgate_ports) != len(addresses):
        raise ValueError(f"{sample} fronts {len(addresses)} lmgate(s); got ports {list(lmgate_ports)}")
    text = replace_documented(text, "listen 80;", f"listen 127.0.0.1:{listen_port};", sample=sample)
    for address, port in zip(addresses, lmgate_ports, strict=True):
        text = replace_documented(text, address, f"127.0.0.1:{port}", sample=sample)
    text = replace_documented(text, ACCESS_LOG, str(log_dir / "access.log"), sample=sample)
    if sample == "subpath.conf":
        root = site_root or log_dir / "site"
        root.mkdir(parents=True, exist_ok=True)
        text = replace_documented(text, SITE_ROOT, f"root {root};", sample=sample)
    if read_timeout is not None:
        text = replace_documented(text, SHIPPED_READ_TIMEOUT, f"proxy_read_timeout {read_timeout};", sample=sample)
    for old, new in (edits or {}).items():
        text = replace_documented(text, old, new, sample=sample)
    leftover = re.findall(r"127\.0\.0\.1:80\d\d\b", text)
    assert not leftover, f"{sample}: unrendered lmgate addresses {leftover}"
    return text


def main_config(directory: Path, site: Path) -> str:
    """A minimal nginx.conf that keeps every path NGINX writes inside ``directory``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers need the (0700) temp directory
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\n"
        f"pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "    default_type application/octet-stream;\n"
        f"    access_log {directory / 'other.access.log'};\n"
        f"{temp}\n"
        f"    include {site};\n"
        "}\n"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_port(
    port: int,
    *,
    alive: Callable[[], bool],
    what: str,
    bound: Callable[[], bool] = lambda: True,
    timeout: float = _START_TIMEOUT_S,
) -> None:
    """Poll until the process says it has ``bound`` its socket and ``port`` accepts a connection
    (bounded in time); fail early when the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError(f"{what} exited before it listened on port {port}")
        try:
            if not bound():
                raise ConnectionRefusedError
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not listen on port {port} within {timeout} s") from None
            await anyio.sleep(_POLL_S)
        else:
            await stream.aclose()
            return


async def stop_process(process: Process, sig: int = signal.SIGTERM) -> None:
    """Signal, wait (bounded), then kill; always reaps. Shielded: it runs in ``finally`` blocks."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(sig)
            with anyio.move_on_after(_STOP_TIMEOUT_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        await process.aclose()


# --- NGINX ----------------------------------------------------------------------------------------


@dataclass
class RunningNginx:
    sample: str
    port: int
    directory: Path
    site: Path

    @property
    def url(self) -> str:
        """The server's root URL (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        """Where lmgate is mounted: the root, or ``/llm`` for the sub-path sample."""
        return self.url + PREFIX[self.sample]

    def access_log(self) -> list[str]:
        path = self.directory / "access.log"
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def nginx_command(binary: str, directory: Path, *extra: str) -> list[str]:
    return [
        binary, "-c", str(directory / "nginx.conf"), "-p", str(directory), "-e", str(directory / "error.log"),
        "-g", "daemon off;", *extra,
    ]  # fmt: skip


def write_nginx_config(directory: Path, sample: str, **render: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    site = directory / sample
    site.write_text(render_sample(sample, log_dir=directory, **render), encoding="utf-8")
    (directory / "nginx.conf").write_text(main_config(directory, site), encoding="utf-8")
    return site


def check_config(binary: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on the rendered configuration."""
    return subprocess.run(nginx_command(binary, directory, "-t"), capture_output=True, text=True, timeout=30)


@asynccontextmanager
async def run_nginx(
    binary: str,
    directory: Path,
    sample: str,
    *,
    lmgate_ports: Sequence[int],
    read_timeout: str | None = None,
    site_root: Path | None = None,
    edits: Mapping[str, str] | None = None,
) -> AsyncIterator[RunningNginx]:
    """NGINX with ``sample`` in front of lmgate at ``lmgate_ports``, until the block exits."""
    for attempt in range(_PORT_ATTEMPTS):  # a free port may be taken before NGINX binds it
        port = free_port()
        site = write_nginx_config(
            directory, sample, listen_port=port, lmgate_ports=lmgate_ports, site_root=site_root,
            read_timeout=read_timeout, edits=edits,
        )  # fmt: skip
        error_log, pid_file = directory / "error.log", directory / "nginx.pid"
        error_log.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)
        process = await anyio.open_process(
            nginx_command(binary, directory), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            # NGINX writes its pid file only after binding every listen socket: until then, a
            # connection could reach whoever else took the port.
            await wait_for_port(port, alive=lambda process=process: process.returncode is None, bound=pid_file.exists, what="nginx")
        except RuntimeError:
            await stop_process(process)
            log = error_log.read_text(errors="replace") if error_log.exists() else ""
            if "Address already in use" in log and attempt + 1 < _PORT_ATTEMPTS:
                continue
            raise RuntimeError(f"nginx did not start:\n{log}") from None
        except BaseException:
            await stop_process(process)
            raise
        try:
            yield RunningNginx(sample, port, directory, site)
        finally:
            await stop_process(process)
        return


@pytest.fixture(params=SAMPLES)
def sample(request: pytest.FixtureRequest) -> str:
    """Each sample config in ``deploy/nginx/`` in turn."""
    return str(request.param)


@pytest.fixture
def nginx_check(nginx_bin: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``nginx_check(sample, lmgate_ports=[...])``: render the sample and run ``nginx -t`` on it."""

    def check(sample: str, **render: Any) -> subprocess.CompletedProcess[str]:
        directory = tmp_path / f"check-{sample}"
        write_nginx_config(directory, sample, listen_port=free_port(), **render)
        return check_config(nginx_bin, directory)

    return check


@pytest.fixture
def nginx(nginx_bin: str, tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[RunningNginx]]:
    """``async with nginx("single.conf", lmgate_ports=[port]) as proxy``; see ``run_nginx``."""
    numbers = count()

    def start(sample: str, **options: Any) -> AbstractAsyncContextManager[RunningNginx]:
        return run_nginx(nginx_bin, tmp_path / f"nginx-{next(numbers)}", sample, **options)

    return start


# --- a scripted upstream that looks like a plain OpenAI-compatible server ---------------------------

_JSON = [(b"content-type", b"application/json")]
_EMPTY_LISTING = b'{"object":"list","data":[]}'
_NOT_FOUND = b'{"error":{"message":"no such route","type":"invalid_request_error","code":"not_found"}}'


@pytest.fixture
def script(upstream: Any) -> Callable[[Mapping[str, Any]], Any]:
    """``script({"/v1/chat/completions": handler})``: the scripted upstream (``tests/conftest.py``)
    answers those paths with those handlers, ``GET /v1/models`` with an empty list and anything else
    with 404, as an OpenAI-compatible server without LM Studio's own APIs does. lmgate's model
    tracking then forwards the scripted requests untouched, whatever else it asks the upstream.
    Tests find their requests in ``upstream.requests`` by path."""

    def set_routes(routes: Mapping[str, Any]) -> Any:
        async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
            handler = routes.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
            listing = scope["path"] == "/v1/models"
            await send({"type": "http.response.start", "status": 200 if listing else 404, "headers": _JSON})
            await send({"type": "http.response.body", "body": _EMPTY_LISTING if listing else _NOT_FOUND})

        upstream.handler = dispatch
        return upstream

    return set_routes


# --- lmgate ---------------------------------------------------------------------------------------


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def lmgate_settings(upstream_url: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return merge({"upstream": {"url": upstream_url}}, overrides or {})


@pytest.fixture
def lmgate() -> Callable[..., AbstractAsyncContextManager[Any]]:
    """``async with lmgate(upstream_url, {"timeouts": {...}}) as server``: in-process, free port."""
    from gateway.app import build_app
    from gateway.config.settings import Config
    from gateway.server.serving import serve_in_background

    @asynccontextmanager
    async def start(upstream_url: str, overrides: Mapping[str, Any] | None = None) -> AsyncIterator[Any]:
        config = Config.model_validate(lmgate_settings(upstream_url, overrides))
        async with serve_in_background(build_app(config)) as server:
            yield server

    return start


_LISTENING = re.compile(r"lmgate listening on http://127\.0\.0\.1:(\d+)")
_CLEAN_ENV = ("LLM_REQUEST_TIMEOUT_MS", "LLM_MAX_RETRIES", "LLM_RETRY_BACKOFF_MS", "EVAL_CONCURRENCY")


@dataclass
class LmgateProcess:
    """A real ``python -m gateway serve`` process; its stdout (JSON logs) and stderr go to files."""

    process: Process
    port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        records = []
        for line in self.stdout.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records

    async def wait(self, timeout: float) -> int:
        with anyio.fail_after(timeout):
            return await self.process.wait()


@pytest.fixture
def lmgate_process(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[LmgateProcess]]:
    """``async with lmgate_process(upstream_url, overrides) as replica``: a subprocess on a free port."""
    numbers = count()

    @asynccontextmanager
    async def start(upstream_url: str, overrides: Mapping[str, Any] | None = None) -> AsyncIterator[LmgateProcess]:
        directory = tmp_path / f"lmgate-{next(numbers)}"
        directory.mkdir()
        config = directory / "lmgate.yaml"
        settings = merge({"logging": {"format": "json"}}, lmgate_settings(upstream_url, overrides))
        config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_") and k not in _CLEAN_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        stdout, stderr = directory / "stdout.log", directory / "stderr.log"
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", "0"]
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = await anyio.open_process(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO, env=env)
        try:
            port = await _announced_port(process, stderr)
            await wait_for_port(port, alive=lambda: process.returncode is None, what="lmgate")
            yield LmgateProcess(process, port, stdout, stderr)
        finally:
            await stop_process(process, signal.SIGKILL)  # tests that drain send SIGTERM themselves

    return start


async def _announced_port(process: Process, stderr: Path) -> int:
    """The port from lmgate's start-up line on stderr (bounded poll of the file)."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        match = _LISTENING.search(stderr.read_text(encoding="utf-8", errors="replace"))
        if match:
            return int(match.group(1))
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"lmgate did not announce its port:\n{stderr.read_text(errors='replace')}")
        await anyio.sleep(_POLL_S)


@pytest.fixture
def deployed(
    nginx: Callable[..., AbstractAsyncContextManager[RunningNginx]],
    lmgate: Callable[..., AbstractAsyncContextManager[Any]],
) -> Callable[..., AbstractAsyncContextManager[RunningNginx]]:
    """``async with deployed(sample, upstream_url) as proxy``: one in-process lmgate for each
    address the sample names (two for the replicas sample), all forwarding to ``upstream_url``,
    and NGINX in front of them. ``overrides`` go to lmgate's config, the rest to ``run_nginx``."""

    @asynccontextmanager
    async def start(
        sample: str, upstream_url: str, overrides: Mapping[str, Any] | None = None, **nginx_options: Any
    ) -> AsyncIterator[RunningNginx]:
        async with AsyncExitStack() as stack:
            ports = [
                (await stack.enter_async_context(lmgate(upstream_url, overrides))).port
                for _ in LMGATE_ADDRESSES[sample]
            ]
            yield await stack.enter_async_context(nginx(sample, lmgate_ports=ports, **nginx_options))

    return start
