"""Readiness and LLM health, so a health route can never hammer LM Studio.

* :func:`readiness` answers ``/readyz`` from what lmgate already knows, and never asks the
  upstream itself: an orchestrator may call it as often as it likes, without a key, and cause no
  upstream request. Not ready: draining, preloading, the upstream-wide circuit open (the breaker
  saw the upstream fail and is shedding requests), or the latest model-state refresh, while it is
  current (``models.refresh_s``), got no HTTP answer at all. Each of these clears by itself (the
  circuit half-opens after its cool-down; a refresh older than ``refresh_s`` no longer counts), so
  a load balancer that stops sending traffic on a 503 gets the instance back. Nothing known about
  the upstream yet counts as ready: the first requests will tell.
* :class:`LlmHealth` answers ``/lmgate/health/llm`` with a real 1-token generation per model,
  concurrently, cached for ``health.llm_check_ttl_s`` and single-flight (callers arriving during
  a check share its result), together with :class:`LatencyWindows`' rolling p50/p95/p99 of the
  latency and time to first token of real traffic.

A check of a model that is not loaded makes LM Studio load it (JIT): that is what a real
generation costs, and it is why the models to check are configured, not discovered.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import anyio
import httpx
from opentelemetry.instrumentation.utils import suppress_http_instrumentation

from gateway.errors import describe
from middleware.types import Clock

_PING = [{"role": "user", "content": "Reply with one word: ok"}]


class LatencyWindows:
    """Per model, the latencies of recent successful requests, for rolling percentiles.

    Bounded twice: ``max_samples`` per model (a deque) and ``max_models`` models (models whose
    window emptied are forgotten first; past that, new models are not tracked).
    """

    def __init__(
        self, *, window_s: float, max_samples: int = 1000, max_models: int = 64, clock: Clock = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.max_samples = max_samples
        self.max_models = max_models
        self.clock = clock
        self._samples: dict[str, deque[tuple[float, float, float | None]]] = {}

    def add(self, model: str, latency_s: float, ttft_s: float | None) -> None:
        samples = self._samples.get(model)
        if samples is None:
            if len(self._samples) >= self.max_models:
                self._forget_idle()
                if len(self._samples) >= self.max_models:
                    return
            samples = self._samples[model] = deque(maxlen=self.max_samples)
        samples.append((self.clock(), latency_s, ttft_s))

    def models(self) -> list[str]:
        """Models with samples inside the window, most recent traffic first."""
        live = [(samples[-1][0], model) for model, samples in self._samples.items() if self._expire(samples)]
        return [model for _, model in sorted(live, reverse=True)]

    def summary(self, model: str) -> dict[str, Any] | None:
        """``{"count", "latency_ms": {p50, p95, p99}, "ttft_ms": {...} | None}`` over the window."""
        samples = self._samples.get(model)
        if samples is None or not self._expire(samples):
            return None
        latencies = sorted(latency for _, latency, _ in samples)
        ttfts = sorted(ttft for _, _, ttft in samples if ttft is not None)
        return {
            "count": len(latencies),
            "window_s": self.window_s,
            "latency_ms": _percentiles(latencies),
            "ttft_ms": _percentiles(ttfts) if ttfts else None,
        }

    def _expire(self, samples: deque[tuple[float, float, float | None]]) -> int:
        horizon = self.clock() - self.window_s
        while samples and samples[0][0] < horizon:
            samples.popleft()
        return len(samples)

    def _forget_idle(self) -> None:
        for model in [m for m, samples in self._samples.items() if not self._expire(samples)]:
            del self._samples[model]


def _percentiles(ordered: list[float]) -> dict[str, int]:
    """Nearest-rank p50/p95/p99 of ``ordered`` (seconds), in whole milliseconds."""
    size = len(ordered)
    return {
        name: round(ordered[min(size - 1, max(0, math.ceil(q * size) - 1))] * 1000)
        for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
    }


class _Cached:
    """A value recomputed at most once per ``ttl_s``; concurrent callers share one computation."""

    def __init__(self, ttl_s: float, clock: Clock) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.value: Any = None
        self.at = -math.inf
        self.lock = anyio.Lock()

    def fresh(self) -> bool:
        return self.value is not None and self.clock() - self.at < self.ttl_s

    def store(self, value: Any) -> Any:
        self.value, self.at = value, self.clock()
        return value


def readiness(
    *, draining: bool, preloaded: bool, circuit: str | None, unreachable: str | None
) -> tuple[int, dict[str, str]]:
    """(status, body) for ``/readyz`` from known state; see the module docstring.

    ``circuit``: the upstream-wide circuit's state (None without a breaker); ``unreachable``: why
    the current model-state refresh got no answer (None when it did, or is not current).
    """
    if draining:
        return 503, {"status": "draining"}
    if not preloaded:
        return 503, {"status": "preloading"}
    if circuit == "open":
        return 503, {"status": "circuit_open", "reason": "the upstream kept failing; requests are shed until the cool-down ends"}
    if unreachable is not None:
        return 503, {"status": "upstream_unreachable", "reason": unreachable}
    return 200, {"status": "ready"}


class LlmHealth:
    """``/lmgate/health/llm``: a 1-token generation per model plus rolling latency; see the module docstring."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        upstream_url: str,
        *,
        api_key: str | None,
        models: Iterable[str],
        ttl_s: float,
        timeout_s: float,
        windows: LatencyWindows,
        clock: Clock = time.monotonic,
    ) -> None:
        self.client = client
        self.url = upstream_url.rstrip("/") + "/v1/chat/completions"
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.models = tuple(models)
        self.timeout_s = timeout_s
        self.windows = windows
        self.clock = clock
        self._cache = _Cached(ttl_s, clock)

    async def report(self) -> tuple[int, dict[str, Any]]:
        """(200 or 503, the report document)."""
        cached = self._cache.fresh()
        if not cached:
            async with self._cache.lock:
                cached = self._cache.fresh()
                if not cached:
                    self._cache.store(await self._check_all())
        status, document = self._cache.value
        return status, {**document, "cached": cached}

    async def _check_all(self) -> tuple[int, dict[str, Any]]:
        models = self.models or tuple(self.windows.models())
        checks: dict[str, dict[str, Any]] = {}
        async with anyio.create_task_group() as tg:
            for model in models:
                tg.start_soon(self._check, model, checks)
        failed = [f"{model}: {check['reason']}" for model, check in checks.items() if not check["ok"]]
        document: dict[str, Any] = {
            "status": "ok" if models and not failed else "unhealthy",
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "models": {
                model: {**checks[model], "rolling": self.windows.summary(model)} for model in models
            },
        }
        if not models:
            document["reason"] = "no model to check: set health.models, or send traffic first"
        elif failed:
            document["reason"] = "; ".join(failed)
        return (200 if document["status"] == "ok" else 503), document

    async def _check(self, model: str, checks: dict[str, dict[str, Any]]) -> None:
        started = self.clock()
        body = {"model": model, "messages": _PING, "max_tokens": 1, "temperature": 0, "stream": False}
        reason: str | None = None
        with suppress_http_instrumentation():
            try:
                response = await self.client.post(self.url, json=body, headers=self.headers, timeout=self.timeout_s)
            except httpx.HTTPError as exc:
                reason = describe(exc)
            else:
                reason = _generation_problem(response)
        checks[model] = {"ok": reason is None, "latency_ms": round((self.clock() - started) * 1000), "reason": reason}


def _generation_problem(response: httpx.Response) -> str | None:
    """None when ``response`` is a completion, else a short reason."""
    try:
        document = response.json()
    except ValueError:
        document = None
    if response.status_code == 200 and isinstance(document, dict) and document.get("choices"):
        return None
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return f"HTTP {response.status_code}: {message or response.text[:200]}"
