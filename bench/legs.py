"""The configurations under test ("legs"): each starts one proxy in front of the mock.

* ``direct``: no proxy; the generator talks to the mock (the harness's own ceiling).
* ``nginx``: Debian's NGINX as a plain reverse proxy, one worker, unbuffered, upstream keep-alive.
* ``litellm``: LiteLLM's proxy, one worker, in its own virtual environment (optional).
* ``relay``: lmgate's stack without its layers (``bench/relay.py`` on hypercorn and uvloop with
  lmgate's own upstream client): the anchor of "lmgate's layers cost at most 1.3x the bare relay".
* ``lmgate``: ``python -m gateway serve`` with the default middleware stack (on uvloop, its default).
* ``lmgate-asyncio`` (diagnostic): the same on asyncio's own event loop (``listen.event_loop``).
* ``lmgate-all``: every optional layer on (tracing to the mock's OTLP sink, adaptive and per-model
  concurrency, per-model breaker with a failure ratio).
* ``lmgate-redis``: ``lmgate`` with its concurrency slots shared on a redis-server of its own
  (``state.redis_url``, not pinned): what the Redis round trips add to a request.

lmgate is driven only through its command line and config file, never its internals. Both lmgate
legs size the upstream pool and the concurrency limit for the bench's 1,000 streams (the defaults,
100 connections and 4 in flight, are LM Studio policy, not overhead: with them most of the 64 or
1,000 clients would be queued or refused, which would measure the queue, not the proxy).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import BENCH_KEY
from bench.procs import Process, free_port, wait_line, wait_port

REPO = Path(__file__).resolve().parent.parent

LEG_NAMES = ("direct", "nginx", "litellm", "relay", "lmgate", "lmgate-all", "lmgate-redis")
# Diagnostic legs (bench/relay.py): "relay" or "lmgate", then any of hypercorn|uvicorn, uvloop,
# httpx2 (relay only), e.g. relay-uvicorn-uvloop, relay-hypercorn-httpx2, lmgate-uvicorn-uvloop.
DIAGNOSTIC_LEGS = ("relay-hypercorn", "relay-hypercorn-httpx2", "relay-hypercorn-uvloop", "relay-uvicorn-uvloop",
                   "relay-uvicorn-uvloop-httpx2", "relay-hypercorn-uvloop-aiohttpx", "relay-hypercorn-uvloop-aiohttp",
                   "relay-uvicorn-uvloop-aiohttp", "lmgate-hypercorn-uvloop", "lmgate-uvicorn-uvloop", "lmgate-asyncio")
# The relay's upstream client: httpx (default), Pydantic's fork, httpx over aiohttp's I/O, aiohttp itself.
_CLIENTS = ("httpx2", "aiohttpx", "aiohttp", "lmgate")


def is_diagnostic(name: str) -> bool:
    app, *flags = name.split("-")
    clients = [flag for flag in flags if flag in _CLIENTS]
    return app in ("relay", "lmgate") and bool(flags) and set(flags) <= {"hypercorn", "uvicorn", "uvloop", *_CLIENTS} and (
        app == "relay" or not clients) and len(clients) <= 1 and not (app == "lmgate" and flags == ["hypercorn"])

# Sizing shared by the proxies so that none of them queues the bench's clients.
POOL_CONNECTIONS = 2048
POOL_KEEPALIVE = 128


class Leg:
    name = ""
    version = ""

    def __init__(self) -> None:
        self.process: Process | None = None
        self.url = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, mock_url: str, work: Path, cpus: Sequence[int] | None) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


class Direct(Leg):
    name = "direct"
    version = "no proxy"

    def start(self, mock_url: str, work: Path, cpus: Sequence[int] | None) -> None:
        self.url = mock_url


class Nginx(Leg):
    name = "nginx"

    @staticmethod
    def available() -> str | None:
        """Why NGINX cannot run here, or None."""
        return None if shutil.which("nginx") else "nginx is not installed (apt-get install -y nginx)"

    def __init__(self) -> None:
        super().__init__()
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        self.version = (out.stderr or out.stdout).strip().replace("nginx version: ", "")

    def start(self, mock_url: str, work: Path, cpus: Sequence[int] | None) -> None:
        prefix = work / "nginx"
        prefix.mkdir(parents=True, exist_ok=True)
        port = free_port()
        mock = mock_url.removeprefix("http://")
        conf = prefix / "nginx.conf"
        temp = "\n".join(f"  {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf.write_text(f"""worker_processes 1;
worker_rlimit_nofile 20000;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log {prefix}/access.log;
{temp}
  upstream mock {{
    server {mock};
    keepalive {POOL_KEEPALIVE};
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
""")
        self.process = Process(
            "nginx", ["nginx", "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log"), "-g", "daemon off;"],
            cpus=cpus, log_dir=work,
        )
        wait_port(port, 10, self.process.popen)
        self.url = f"http://127.0.0.1:{port}"


class LiteLLM(Leg):
    name = "litellm"

    def __init__(self, venv: Path) -> None:
        super().__init__()
        self.venv = venv
        out = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True, text=True,
        )
        self.version = out.stdout.strip() or "unknown"

    @staticmethod
    def available(venv: Path) -> str | None:
        if not (venv / "bin" / "litellm").exists():
            return f"no LiteLLM at {venv} (python -m bench --install-litellm makes it)"
        return None

    def start(self, mock_url: str, work: Path, cpus: Sequence[int] | None) -> None:
        port = free_port()
        config = work / "litellm.json"
        config.write_text(json.dumps({
            "model_list": [{
                "model_name": "bench",
                "litellm_params": {"model": "openai/bench", "api_base": f"{mock_url}/v1", "api_key": "sk-bench"},
            }],
            "litellm_settings": {"drop_params": True, "telemetry": False},
            "general_settings": {"master_key": BENCH_KEY},
        }))
        env = dict(os.environ)
        env.update({
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch at start-up
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "NO_PROXY": "*",
        })
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "DATABASE_URL"):
            env.pop(key, None)
        self.process = Process(
            "litellm",
            [str(self.venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
             "--port", str(port), "--num_workers", "1"],
            cpus=cpus, log_dir=work, env=env, cwd=str(work),
        )
        wait_port(port, 120, self.process.popen)
        self.url = f"http://127.0.0.1:{port}"


def lmgate_config(mock_url: str, *, everything: bool, event_loop: str = "auto") -> dict[str, object]:
    config: dict[str, object] = {
        "listen": {"host": "127.0.0.1", "port": 0, "event_loop": event_loop},
        # The pool's size follows concurrency.limit (derived); only the idle connections kept are raised.
        "upstream": {"url": mock_url, "pool": {"max_keepalive_connections": POOL_KEEPALIVE}},
        "concurrency": {"limit": POOL_CONNECTIONS, "max_queue": POOL_CONNECTIONS},
    }
    if everything:
        config["retry"] = {"enabled": True}
        config["circuit_breaker"] = {"enabled": True, "per_model": True, "failure_ratio": 0.5}
        config["concurrency"] = {"enabled": True, "limit": POOL_CONNECTIONS, "max_queue": POOL_CONNECTIONS,
                                 "per_model": True, "adaptive": True, "min_limit": 64,
                                 "max_limit": POOL_CONNECTIONS}
        config["metrics"] = {"enabled": True}
        config["tracing"] = {"enabled": True, "exporter": "otlp", "endpoint": f"{mock_url}/v1/traces",
                             "sample_ratio": 1.0}
    return config


class Lmgate(Leg):
    def __init__(self, name: str, *, everything: bool, redis: bool = False, event_loop: str = "auto") -> None:
        super().__init__()
        self.name = name
        self.everything = everything
        self.redis = redis
        self.redis_process: Process | None = None
        self.event_loop = event_loop
        out = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, cwd=REPO)
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "middleware"],
                               capture_output=True, text=True, cwd=REPO)
        self.version = f"{out.stdout.strip().removeprefix('lmgate ')} ({rev.stdout.strip()}" + (
            ", uncommitted changes in gateway/ middleware/)" if dirty.stdout.strip() else ")")

    @staticmethod
    def redis_available() -> str | None:
        """Why the lmgate-redis leg cannot run here, or None."""
        return None if shutil.which("redis-server") else "redis-server is not installed (apt-get install -y redis-server)"

    def start(self, mock_url: str, work: Path, cpus: Sequence[int] | None) -> None:
        config = work / f"{self.name}.yaml"
        settings = lmgate_config(mock_url, everything=self.everything, event_loop=self.event_loop)
        if self.redis:
            settings["state"] = {"redis_url": self._start_redis(work, cpus)}
        config.write_text(json.dumps(settings, indent=1))  # JSON is YAML
        env = dict(os.environ)
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(key, None)
        self.process = Process(
            self.name, [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cpus=cpus, log_dir=work, env=env, cwd=str(REPO),
        )
        match = wait_line(self.process.err, r"lmgate listening on (http://[^\s,]+)", 30, self.process.popen)
        self.url = match.group(1)

    def _start_redis(self, work: Path, cpus: Sequence[int] | None) -> str:
        """A redis-server beside lmgate, persisting nothing; its URL. Not pinned: a Redis shared by
        replicas runs beside them, not inside one replica's CPU budget."""
        port = free_port()
        self.redis_process = Process(
            f"{self.name}-redis-server",
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(work)],
            cpus=None, log_dir=work,
        )  # fmt: skip
        wait_port(port, 10, self.redis_process.popen)
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        super().stop()
        if self.redis_process is not None:
            self.redis_process.stop()
            self.redis_process = None


class Diagnostic(Leg):
    """``bench/relay.py`` under ``python``: ``relay-uvicorn-uvloop``, ``lmgate-uvicorn``..."""

    def __init__(self, name: str, python: str) -> None:
        super().__init__()
        self.name = name
        app, *flags = ("relay-hypercorn-uvloop-lmgate" if name == "relay" else name).split("-")
        self.app = app
        self.server = "uvicorn" if "uvicorn" in flags else "hypercorn"
        self.loop = "uvloop" if "uvloop" in flags else "asyncio"
        self.client = next((flag for flag in flags if flag in _CLIENTS), "httpx")
        self.python = python
        packages = {"aiohttpx": ["httpx", "httpx-aiohttp", "aiohttp"],
                    "lmgate": ["httpx", "aiohttp"]}.get(self.client, [self.client])
        probe = "import importlib.metadata as m; print(', '.join(p + ' ' + m.version(p) for p in %r))" % (
            [*packages, self.server] + (["uvloop"] if self.loop == "uvloop" else []))
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=REPO)
        self.problem = None if out.returncode == 0 else f"{python} lacks {self.server}/{self.loop}: {out.stderr.strip().splitlines()[-1:]}"
        self.version = out.stdout.strip()

    def start(self, mock_url: str, work: Path, cpus: Sequence[int] | None) -> None:
        argv = [self.python, "-m", "bench.relay", "--app", self.app, "--server", self.server, "--loop", self.loop,
                "--client", self.client, "--upstream", mock_url]
        if self.app == "lmgate":
            config = work / f"{self.name}.yaml"
            config.write_text(json.dumps(lmgate_config(mock_url, everything=False), indent=1))
            argv += ["--config", str(config)]
        self.process = Process(self.name, argv, cpus=cpus, log_dir=work, cwd=str(REPO))
        self.url = wait_line(self.process.err, r"relay listening on (http://\S+)", 30, self.process.popen).group(1)


def make_legs(names: Sequence[str], *, litellm_venv: Path, alt_python: str = sys.executable) -> tuple[list[Leg], dict[str, str]]:
    """The legs that can run here, and why the others cannot."""
    legs: list[Leg] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == "direct":
            legs.append(Direct())
        elif name == "nginx":
            reason = Nginx.available()
            if reason:
                skipped[name] = reason
            else:
                legs.append(Nginx())
        elif name == "litellm":
            reason = LiteLLM.available(litellm_venv)
            if reason:
                skipped[name] = reason
            else:
                legs.append(LiteLLM(litellm_venv))
        elif name == "relay":
            legs.append(Diagnostic(name, sys.executable))
        elif name == "lmgate":
            legs.append(Lmgate("lmgate", everything=False))
        elif name == "lmgate-all":
            legs.append(Lmgate("lmgate-all", everything=True))
        elif name == "lmgate-redis":
            reason = Lmgate.redis_available()
            if reason:
                skipped[name] = reason
            else:
                legs.append(Lmgate("lmgate-redis", everything=False, redis=True))
        elif name == "lmgate-asyncio":
            legs.append(Lmgate("lmgate-asyncio", everything=False, event_loop="asyncio"))
        elif is_diagnostic(name):
            leg = Diagnostic(name, alt_python)
            if leg.problem:
                skipped[name] = leg.problem
            else:
                legs.append(leg)
        else:
            raise ValueError(f"unknown leg {name!r}; known: {', '.join(LEG_NAMES + DIAGNOSTIC_LEGS)}")
    return legs, skipped
