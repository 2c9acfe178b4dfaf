"""What ``lmgate doctor`` found, as plain data: rendered as a table, or as JSON with ``--json``."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Level = Literal["escalate", "warn", "ok", "info"]


@dataclass
class ServerInfo:
    url: str
    reachable: bool = False
    #: "lmgate", "lm-studio", "openai-compatible" or "unknown".
    kind: str = "unknown"
    #: Which API generations answered in their own shape: "api/v1", "api/v0", "v1" (plain OpenAI).
    apis: dict[str, bool] = field(default_factory=dict)
    latency_ms: int | None = None
    error: str | None = None


@dataclass
class ModelInfo:
    id: str
    type: str | None = None
    #: "loaded", "not-loaded", "loading", "failed" or "unknown" (a plain OpenAI listing does not say).
    state: str = "unknown"
    context_length: int | None = None
    max_context_length: int | None = None

    @property
    def generates(self) -> bool:
        return self.type not in ("embedding", "embeddings")


@dataclass
class UpstreamCheck:
    """One upstream of an lmgate with several: as lmgate reports it, or as the doctor found it."""

    name: str
    url: str
    #: "lmgate" (what the lmgate checked says of it) or "direct" (the doctor asked it, from --config).
    seen_by: str
    reachable: bool = False
    error: str | None = None
    #: Direct checks: "lm-studio", "openai-compatible"... (as ``ServerInfo.kind``) and the answer time.
    kind: str | None = None
    latency_ms: int | None = None
    #: Models it lists, and those loaded there (lmgate's view knows loaded ones only when it says so).
    models: int | None = None
    loaded: list[str] = field(default_factory=list)
    #: lmgate's view: its circuit for the upstream and its slots ({limit, in_flight, queued}).
    circuit: str | None = None
    slots: dict[str, int] | None = None


@dataclass
class Attempt:
    """One measured streamed generation."""

    ok: bool
    latency_s: float
    category: str | None = None
    code: str | None = None
    message: str | None = None
    status: int | None = None
    #: The connection closed, by either side, after the request was sent and before the answer was
    #: complete: what LM Studio logs as "Client disconnected. Stopping generation..." (the guide's word).
    disconnected: bool = False
    ttft_s: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    #: Longest time without a byte: request sent -> headers -> each chunk.
    longest_silence_s: float = 0.0
    heartbeats: int = 0
    #: lmgate's X-Lmgate-Load-Ms: how long this request waited for a model load.
    load_s: float | None = None


@dataclass
class Generations:
    model: str
    concurrency: int
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def failures(self) -> list[Attempt]:
        return [a for a in self.attempts if not a.ok]

    @property
    def failure_ratio(self) -> float:
        return len(self.failures) / len(self.attempts) if self.attempts else 0.0

    def summary(self) -> dict[str, Any]:
        ok = [a for a in self.attempts if a.ok]
        by_category: dict[str, int] = {}
        for attempt in self.failures:
            by_category[attempt.category or "unknown"] = by_category.get(attempt.category or "unknown", 0) + 1
        rates = [a.tokens_per_s for a in ok if a.tokens_per_s is not None]
        return {
            "model": self.model,
            "requests": len(self.attempts),
            "concurrency": self.concurrency,
            "succeeded": len(ok),
            "failed": len(self.failures),
            "failed_by_category": dict(sorted(by_category.items(), key=lambda item: -item[1])),
            "disconnects": sum(a.disconnected for a in self.attempts),
            "ttft_ms": percentiles_ms([a.ttft_s for a in ok if a.ttft_s is not None]),
            "latency_ms": percentiles_ms([a.latency_s for a in ok]),
            "tokens_per_s": {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1)} if rates else None,
            "errors": sorted({f"{a.category}: {a.message}" for a in self.failures if a.message})[:5],
        }


@dataclass
class TinyPrompt:
    """The guide's "failures on first attempt even with tiny prompts": a one-token request, twice at most."""

    attempts: list[Attempt] = field(default_factory=list)

    @property
    def first_failed(self) -> bool:
        return bool(self.attempts) and not self.attempts[0].ok

    @property
    def consistent_failure(self) -> bool:
        return len(self.attempts) > 1 and not any(a.ok for a in self.attempts)


@dataclass
class ColdLoad:
    model: str
    unloaded: list[str] = field(default_factory=list)
    first_token_s: float | None = None
    load_s: float | None = None
    ok: bool = False
    note: str | None = None


@dataclass
class HeartbeatCheck:
    #: "ok" (silences were filled), "fail" (a silence longer than the heartbeat window), "untested".
    verdict: str
    heartbeat_s: float | None
    longest_silence_s: float
    heartbeats_seen: int
    source: str
    note: str


@dataclass
class Advice:
    level: Level
    text: str


@dataclass
class Report:
    server: ServerInfo
    models: list[ModelInfo] = field(default_factory=list)
    tiny_prompt: TinyPrompt | None = None
    cold: ColdLoad | None = None
    generations: Generations | None = None
    heartbeat: HeartbeatCheck | None = None
    advice: list[Advice] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    #: An lmgate's upstreams as it reports them, then each one checked directly (``--config``).
    upstreams: list[UpstreamCheck] = field(default_factory=list)

    @property
    def escalate(self) -> bool:
        return any(a.level == "escalate" for a in self.advice)

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": asdict(self.server),
            "models": [asdict(m) for m in self.models],
            "tiny_prompt": [_attempt(a) for a in self.tiny_prompt.attempts] if self.tiny_prompt else None,
            "cold_load": asdict(self.cold) if self.cold else None,
            "generations": self.generations.summary() if self.generations else None,
            "heartbeat": asdict(self.heartbeat) if self.heartbeat else None,
            "advice": [asdict(a) for a in self.advice],
            "escalate": self.escalate,
            "environment": self.environment,
            "upstreams": [asdict(u) for u in self.upstreams],
        }


def _attempt(attempt: Attempt) -> dict[str, Any]:
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(attempt).items()}


def percentiles_ms(values: list[float]) -> dict[str, int] | None:
    """Nearest-rank p50/p95/p99 of ``values`` (seconds) in whole milliseconds; None when empty."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"p50": round(rank(0.50) * 1000), "p95": round(rank(0.95) * 1000), "p99": round(rank(0.99) * 1000)}
