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

Only models that can chat are probed. The upstream's listing says which (LM Studio's ``type``:
``llm`` and ``vlm`` chat, ``embeddings`` does not); a model of another type is *skipped*, never
sent a chat request. A probe the upstream refuses as a mistake of the probe itself (400/404
``model_not_found``, or "not an LLM" from an upstream whose listing has no types) is skipped too:
it says nothing about the upstream's health. Every other failure, LM Studio's 400 for a failed
load or a crashed model included, is a failure.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from opentelemetry.instrumentation.utils import suppress_http_instrumentation

from gateway.models.upstream import ModelApiError, UpstreamModels
from gateway.proxy.upstream_errors import describe
from middleware.errors import LmgateError
from middleware.types import Clock

_PING = [{"role": "user", "content": "Reply with one word: ok"}]
#: LM Studio's model types that answer chat requests (``/api/v0/models``; ``/api/v1`` says only ``llm``).
_CHAT_TYPES = frozenset({"llm", "vlm"})
_EMBEDDING_TYPES = frozenset({"embeddings", "embedding"})  # /api/v0 and /api/v1 spellings
# How servers word "this model cannot chat" (the simulator and LM Studio: 'Model "x" is not an LLM.').
_NOT_CHAT = re.compile(r"\bnot an? (llm|language model)\b|\bdoes not support (the )?chat\b", re.IGNORECASE)


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
        name: str = "default",
    ) -> None:
        self.models = tuple(models)
        self.timeout_s = timeout_s
        self.windows = windows
        self.clock = clock
        self.targets: dict[str, _Target] = {}
        self.add_target(name, client, upstream_url, api_key=api_key)
        #: With several upstreams: the upstream a request for a model would go to (the router's choice).
        self.place: Callable[[str], Awaitable[str]] | None = None
        self._cache = _Cached(ttl_s, clock)

    def add_target(self, name: str, client: httpx.AsyncClient, upstream_url: str, *, api_key: str | None) -> None:
        """Another upstream models may be probed on (see :attr:`place`)."""
        listing = UpstreamModels(client, upstream_url, api_key=api_key, request_timeout_s=self.timeout_s)
        self.targets[name] = _Target(client, upstream_url.rstrip("/") + "/v1/chat/completions", listing)

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
        placed: dict[str, list[str]] = {}
        for model in models:
            try:
                where = await self.place(model) if self.place is not None else next(iter(self.targets))
            except LmgateError as exc:  # no upstream has it, or none answered: that is the finding
                checks[model] = _outcome("failed", None, exc.message)
                continue
            placed.setdefault(where, []).append(model)
        async with anyio.create_task_group() as tg:
            for where, placed_models in placed.items():
                tg.start_soon(self._check_on, where, placed_models, checks)
        by_outcome: dict[str, list[str]] = {"ok": [], "failed": [], "skipped": []}
        for model in models:
            by_outcome[checks[model]["status"]].append(f"{model}: {checks[model]['reason']}")
        if by_outcome["failed"] or not models:
            status = "unhealthy"
        elif by_outcome["ok"]:
            status = "ok"
        else:
            status = "unknown"  # every model was skipped
        document: dict[str, Any] = {
            "status": status,
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "models": {
                model: {**checks[model], "rolling": self.windows.summary(model)} for model in models
            },
        }
        if not models:
            document["reason"] = "no model to check: set health.models, or send traffic first"
        elif by_outcome["failed"]:
            document["reason"] = "; ".join(by_outcome["failed"])
        elif status == "unknown":
            document["reason"] = "no model that can chat to check: " + "; ".join(by_outcome["skipped"])
        return (503 if status == "unhealthy" else 200), document

    async def _check_on(self, where: str, models: list[str], checks: dict[str, dict[str, Any]]) -> None:
        target = self.targets[where]
        types = await self._types(target)
        several = len(self.targets) > 1
        async with anyio.create_task_group() as tg:
            for model in models:
                cannot_chat = _cannot_chat(types.get(model))
                if cannot_chat is not None:
                    checks[model] = _outcome("skipped", None, cannot_chat)
                else:
                    tg.start_soon(self._check, target, model, checks)
        if several:
            for model in models:
                checks[model]["upstream"] = where

    async def _types(self, target: _Target) -> dict[str, str | None]:
        """Each listed model's (and loaded instance's) type; empty when the listing is unavailable."""
        with suppress_http_instrumentation():
            try:
                listed = await target.listing.listing()
            except ModelApiError:
                return {}  # the probes will tell what is wrong, if anything
        return {name: entry.type for entry in listed for name in (entry.id, *entry.instances)}

    async def _check(self, target: _Target, model: str, checks: dict[str, dict[str, Any]]) -> None:
        started = self.clock()
        body = {"model": model, "messages": _PING, "max_tokens": 1, "temperature": 0, "stream": False}
        reason: str | None
        headers = target.listing.headers
        with suppress_http_instrumentation():
            try:
                response = await target.client.post(target.url, json=body, headers=headers, timeout=self.timeout_s)
            except httpx.HTTPError as exc:
                outcome, reason = "failed", describe(exc)
            else:
                outcome, reason = _judge(response)
        checks[model] = _outcome(outcome, round((self.clock() - started) * 1000), reason)


@dataclass(frozen=True)
class _Target:
    """One upstream the 1-token checks can be sent to."""

    client: httpx.AsyncClient
    url: str  # its chat completions URL
    listing: UpstreamModels


def _outcome(status: str, latency_ms: int | None, reason: str | None) -> dict[str, Any]:
    """One model's entry: ``ok`` is None when it was skipped (its health is not known)."""
    return {"status": status, "ok": None if status == "skipped" else status == "ok", "latency_ms": latency_ms,
            "reason": reason}


def _cannot_chat(model_type: str | None) -> str | None:
    """Why a model of ``model_type`` is not probed; None when it can chat or its type is unknown."""
    if model_type is None or model_type in _CHAT_TYPES:
        return None
    if model_type in _EMBEDDING_TYPES:
        return f"an embedding model (type {model_type!r}): it cannot chat, so it is not probed"
    return f"type {model_type!r} cannot chat, so it is not probed"


def _judge(response: httpx.Response) -> tuple[str, str | None]:
    """("ok", None) for a completion; ("skipped", why) for the probe's own mistake; else ("failed", why)."""
    try:
        document = response.json()
    except ValueError:
        document = None
    if response.status_code == 200 and isinstance(document, dict) and document.get("choices"):
        return "ok", None
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    reason = f"HTTP {response.status_code}: {message or response.text[:200]}"
    if response.status_code in (400, 404) and (
        code == "model_not_found" or (isinstance(message, str) and _NOT_CHAT.search(message))
    ):
        return "skipped", reason
    return "failed", reason
