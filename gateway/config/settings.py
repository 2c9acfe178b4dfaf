"""lmgate's configuration: YAML validated into frozen, typed models that reject unknown keys.

Sources, lowest precedence first:

1. the defaults below (``lmgate.example.yaml`` lists them all, generated from this module);
2. the YAML file (``--config FILE``);
3. the environment variables users of LM Studio clients already set (``CLIENT_ENV``);
4. ``LMGATE_<SECTION>__<KEY>`` for any key (``LMGATE_TIMEOUTS__FIRST_TOKEN_S=90``); values are
   parsed as YAML scalars, so ``90``, ``true`` and ``[502, 503]`` work;
5. command-line flags (``--host``, ``--port``, ``--upstream``).

A bad value fails before any port is bound, naming the file (or environment variable), the key
path, the value and what was expected: :class:`ConfigError`, exit code 2 from the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from gateway.request.paths import BadPath, resolve_path, wire_path

MiB = 1024 * 1024


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenConfig(Section):
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 or :: for all interfaces).")
    port: int = Field(8080, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Client connections open at once; at the cap the longest idle one is closed for a new one, "
        "or the new one is closed when none is idle. null: the open-files limit less upstream.pool.max_connections "
        "and 64 (docs/production.md).",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="Event loop lmgate serve runs on: uvloop (libuv, in C: less CPU per request and per chunk, "
        "docs/performance.md) or asyncio's own. auto: uvloop where it can be imported (a dependency except on "
        "Windows), else asyncio.",
    )


class PoolConfig(Section):
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Most upstream connections open at once; null: derived, the concurrency limit (max_limit when "
        "adaptive) plus room for loads, keep-warm pings and health checks, unbounded without a total limit.",
    )
    max_keepalive_connections: int = Field(20, ge=0, description="Idle upstream connections kept for reuse.")
    keepalive_expiry_s: float = Field(30.0, gt=0, description="Seconds an idle upstream connection is kept.")


class UpstreamConcurrency(Section):
    """One upstream's own concurrency limits, over the ``concurrency`` section (null: the section's value)."""

    limit: int | None = Field(None, ge=1, description="Requests in flight on this upstream (its parallel slots).")
    max_queue: int | None = Field(None, ge=0, description="Requests waiting for a slot on this upstream.")
    max_wait_s: float | None = Field(None, gt=0, description="Longest wait for a slot on this upstream.")


#: An upstream's name: it appears in metric labels, headers, logs and URLs.
UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class UpstreamConfig(Section):
    name: str = Field(
        "default",
        description="Its name in logs, metrics, traces, X-Lmgate-Upstream and the status page "
        "(lowercase letters, digits, '.', '_', '-').",
    )
    url: str = Field("http://127.0.0.1:1234", description="Base URL of LM Studio or another OpenAI-compatible server.")
    api_key_env: str | None = Field(
        "LMSTUDIO_API_KEY", description="Environment variable holding LM Studio's API token (0.4+), if auth is on."
    )
    api_key: SecretStr | None = Field(None, description="The token itself; prefer api_key_env so it stays out of files.")
    forward_client_auth: bool = Field(
        False, description="Forward the client's Authorization header upstream (off: it is the client's key for lmgate)."
    )
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Upstream connection pool.")
    transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="What moves the upstream bytes under the httpx client: aiohttp (its C parser: about 4x the chunks "
        "per CPU second), or httpx's own (httpcore/h11, pure Python).",
    )

    concurrency: UpstreamConcurrency = Field(
        default_factory=UpstreamConcurrency, description="This upstream's own limits over the concurrency section."
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not UPSTREAM_NAME.fullmatch(value):
            raise ValueError("expected 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host, like http://127.0.0.1:1234")
        if parts.query or parts.fragment:
            raise ValueError("expected a base URL without query or fragment")
        if parts.username or parts.password:
            raise ValueError("expected no credentials in the URL; put LM Studio's token in api_key_env")
        return value.rstrip("/")

    def resolved_api_key(self, env: Mapping[str, str]) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return env.get(self.api_key_env) or None
        return None


class ModelTimeouts(Section):
    first_token_s: float | None = Field(None, gt=0, description="First-token deadline for this model.")
    idle_s: float | None = Field(None, gt=0, description="Idle deadline between chunks for this model.")
    total_s: float | None = Field(None, gt=0, description="Whole-request deadline for this model.")


class TimeoutsConfig(Section):
    connect_s: float = Field(5.0, gt=0, description="Connecting to the upstream.")
    first_token_s: float = Field(
        45.0, gt=0, description="Request start to the first body byte sent to the client (env LLM_REQUEST_TIMEOUT_MS)."
    )
    idle_s: float = Field(30.0, gt=0, description="Longest silence between two body chunks once the response started.")
    total_s: float = Field(600.0, gt=0, description="The whole request, all retries included.")
    per_model: dict[str, ModelTimeouts] = Field(
        default_factory=dict, description="Overrides by model id, e.g. {big-70b: {first_token_s: 120}}."
    )


class RoutesConfig(Section):
    extra_prefixes: tuple[str, ...] = Field((), description="Further path prefixes to forward, e.g. ['/v1/audio/'].")
    assemble_non_streaming: bool | dict[str, bool] = Field(
        True,
        description="Stream upstream and assemble the JSON for non-streaming completions, so a client that "
        "leaves stops generation; true, false, or per route {'/v1/completions': false}.",
    )
    normalise_errors: bool = Field(True, description="Rewrite LM Studio's {error: text} bodies into the OpenAI shape.")

    @field_validator("extra_prefixes")
    @classmethod
    def _absolute(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in value:
            if not prefix.startswith("/") or ".." in prefix or not _plain_path(prefix):
                raise ValueError(f"expected absolute path prefixes like '/v1/audio/', got {prefix!r}")
        return value


def _plain_path(path: str) -> bool:
    """A path as lmgate sees requests once normalised: no '//', dot segments, '%', ';' or '\\'."""
    try:
        return resolve_path(wire_path(path)) == path
    except BadPath:
        return False


class LimitsConfig(Section):
    body_bytes: int = Field(10 * MiB, ge=1, description="Largest request body accepted (413 above it).")
    header_bytes: int = Field(
        12 * 1024, ge=1024, description="Largest request header block (431 above it; the HTTP server cuts at 16 KiB)."
    )
    url_bytes: int = Field(8 * 1024, ge=256, description="Longest request path and query (414 above it).")
    body_idle_s: float = Field(
        5.0, gt=0, description="Longest wait for the next piece of a request body (408 request_timeout after it)."
    )
    body_total_s: float = Field(
        30.0, gt=0, description="Longest time a request body may take to arrive whole (408 request_timeout after it)."
    )
    assembled_bytes: int = Field(
        64 * MiB, ge=1024, description="Largest non-streaming answer lmgate assembles from a stream (502 above it)."
    )
    frame_bytes: int = Field(
        8 * MiB,
        ge=1024,
        description="Largest single SSE frame from the upstream; a bigger one ends the stream with an error frame "
        "(502 when assembled).",
    )


class AuthConfig(Section):
    keys: tuple[str, ...] = Field(
        (), description="SHA-256 digests of client keys ('sha256:<hex>'; `lmgate keys hash` makes one); empty: no auth."
    )
    keys_file: str | None = Field(
        None, description="A file of further digests, one 'sha256:<hex> [name]' per line; read at start-up."
    )
    admin_keys: tuple[str, ...] = Field(
        (), description="Digests of admin keys: needed to load or unload models and for any request that changes state."
    )
    open_paths: tuple[str, ...] = Field(
        ("/healthz", "/readyz", "/metrics"),
        description="Paths answered without a key (GET/HEAD) when auth is on; /metrics names every model: "
        "drop it here to require a key.",
    )
    open_from: Literal["any", "loopback"] = Field(
        "any",
        description="Who reads open_paths without a key: any client, or loopback (this machine; through a local "
        "proxy, by its X-Forwarded-For). Others need a key, or get 403 when no keys are configured.",
    )
    per_key_limit: int | None = Field(
        None, ge=1, description="Requests in flight per client key (429 rate_limited beyond); null: no per-key limit."
    )
    per_key_queue: int = Field(0, ge=0, description="Requests of one key that may wait for its per-key limit.")

    @field_validator("open_paths")
    @classmethod
    def _exact_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("/") or not _plain_path(path):
                raise ValueError(f"expected paths as requested, like '/metrics' (no '//', dot segments, '%' or ';'), got {path!r}")
        return value

    @field_validator("keys", "admin_keys")
    @classmethod
    def _digests(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from middleware.auth import normalise_digest

        return tuple(normalise_digest(digest) for digest in value)

    @model_validator(mode="after")
    def _readable_and_useful(self) -> AuthConfig:
        self.digests()  # a missing or malformed keys file fails at start-up, naming the line
        if self.per_key_limit is not None and not self.enabled:
            raise ValueError("per_key_limit needs client keys (keys, keys_file or admin_keys)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.keys_file or self.admin_keys)

    def digests(self) -> dict[str, str]:
        """Client key digests -> names, from ``keys`` and ``keys_file``."""
        from middleware.auth import parse_keys_file

        named = {digest: f"key-{digest[:8]}" for digest in self.keys}
        if self.keys_file is not None:
            try:
                text = Path(self.keys_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read keys_file {self.keys_file}: {exc.strerror or exc}") from None
            named.update(parse_keys_file(text, source=self.keys_file))
        return named


class RetryConfig(Section):
    enabled: bool = Field(True, description="Retry failed attempts while nothing has reached the client.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries after the first attempt (env LLM_MAX_RETRIES).")
    backoff_base_s: float = Field(0.8, gt=0, description="Backoff before the first retry (env LLM_RETRY_BACKOFF_MS).")
    backoff_max_s: float = Field(20.0, gt=0, description="Longest single backoff.")
    jitter: Literal["full", "decorrelated"] = Field("full", description="Jitter strategy.")
    retry_statuses: tuple[int, ...] = Field((502, 503, 504), description="Upstream statuses that are retried.")
    max_retry_after_s: float = Field(30.0, ge=0, description="Cap on an upstream Retry-After that is honoured.")
    body_limit_bytes: int = Field(1 * MiB, ge=0, description="Larger request bodies are sent once, not replayed.")
    budget_ratio: float = Field(0.2, ge=0, le=1, description="Retries may be at most this share of active requests.")
    budget_min_retries: int = Field(3, ge=0, description="Retries always allowed regardless of the ratio.")


class CircuitBreakerConfig(Section):
    enabled: bool = Field(True, description="Stop sending requests to an upstream that keeps failing.")
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the circuit.")
    failure_ratio: float | None = Field(None, gt=0, le=1, description="Also open at this failure share over window_s.")
    window_s: float = Field(60.0, gt=0, description="Window for failure_ratio.")
    min_requests: int = Field(10, ge=1, description="Requests in the window before failure_ratio applies.")
    reset_timeout_s: float = Field(30.0, gt=0, description="Cool-down before half-open probes.")
    half_open_max_probes: int = Field(1, ge=1, description="Requests admitted while half-open.")
    per_model: bool = Field(False, description="One circuit per model instead of one per upstream.")


class ConcurrencyConfig(Section):
    enabled: bool = Field(True, description="Limit requests in flight to the upstream and queue the rest.")
    limit: int = Field(4, ge=1, description="Requests in flight (LM Studio's default parallel slots; env EVAL_CONCURRENCY).")
    max_queue: int = Field(16, ge=0, description="Requests waiting for a slot; beyond it 503 overloaded.")
    max_wait_s: float = Field(
        30.0, gt=0, description="Longest wait in the queue (and for an upstream connection, should the pool be full)."
    )
    per_model: bool = Field(False, description="Separate limits per model.")
    adaptive: bool = Field(False, description="Let the limit follow observed latency between min_limit and max_limit.")
    min_limit: int = Field(1, ge=1, description="Adaptive lower bound.")
    max_limit: int = Field(16, ge=1, description="Adaptive upper bound.")
    latency_threshold_s: float = Field(
        10.0, gt=0, description="Adaptive: average time to first byte above which the limit is cut by 10%."
    )

    @model_validator(mode="after")
    def _ordered_limits(self) -> ConcurrencyConfig:
        if self.adaptive and not self.min_limit <= self.limit <= self.max_limit:
            raise ValueError(
                f"expected min_limit <= limit <= max_limit with adaptive on, got {self.min_limit}, {self.limit}, {self.max_limit}"
            )
        return self


class DrainConfig(Section):
    timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish.")
    retry_after_s: float = Field(5.0, ge=0, description="Retry-After sent with 503 draining.")


class WebSocketsConfig(Section):
    """LM Studio's SDKs (`lmstudio`, `@lmstudio/sdk`, `lms`) over WebSockets (docs/sdk.md)."""

    enabled: bool = Field(True, description="Relay the SDKs' WebSockets (/llm, /embedding, /system, ...) to the upstream.")
    max_open: int | None = Field(
        None,
        ge=1,
        description="Sockets open at once; beyond it an upgrade is refused (503 overloaded). Unset: four per "
        "request the concurrency settings admit (limit + max_queue), an SDK client opening one per namespace.",
    )
    max_message_bytes: int = Field(
        16 * MiB,
        ge=1024,
        le=16 * MiB,
        description="Largest message (and frame) relayed either way; a larger one closes its sender's socket with "
        "1009. At most 16 MiB, the server's own bound.",
    )
    auth_timeout_s: float = Field(
        10.0, gt=0, description="How long a new socket may take to send its first message (the SDK's auth packet)."
    )


class ModelsConfig(Section):
    enabled: bool = Field(
        True, description="Track model state and load a model before forwarding to it (single flight); off: pass through."
    )
    heartbeat_s: float | None = Field(
        10.0, gt=0, description="An SSE comment after this long without a byte on an event stream, loads included; null: none."
    )
    status_events: bool = Field(
        False,
        description="Also send `event: lmgate.status` JSON frames (loading, eta) for front ends; SDKs see them as "
        "empty chunks.",
    )
    load_timeout_s: float = Field(
        300.0, gt=0, description="Longest model load; the first-token deadline starts only once the model is loaded."
    )
    max_concurrent_loads: int = Field(1, ge=1, description="Loads at once on the upstream (two big ones exhaust memory).")
    on_loading: Literal["wait", "reject"] = Field(
        "wait", description="Non-streaming requests for a loading model: wait, or 503 model_loading with Retry-After."
    )
    preload: tuple[str, ...] = Field((), description="Models loaded at start-up; /readyz is 503 until they are.")
    keep_warm: tuple[str, ...] = Field(
        (), description="Models kept loaded: reloaded when unloaded, pinged with 1 token before their idle TTL ends."
    )
    refresh_s: float = Field(5.0, gt=0, description="How often model state is read from the upstream (and its max age).")
    ttl_s: float | dict[str, float] | None = Field(
        None,
        description="Idle TTL (s) lmgate asks for when it loads or warms a model, for all or per model id; "
        "null: LM Studio's rule (none for API loads).",
    )
    assumed_ttl_s: float = Field(
        3600.0, gt=0, description="The idle TTL keep_warm assumes without ttl_s (LM Studio's JIT default); pings at half."
    )
    load_method: Literal["auto", "rest", "generate"] = Field(
        "auto", description="rest: POST /api/v1/models/load; generate: a 1-token request; auto: rest where it exists."
    )
    pin: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="With several upstreams: model id -> the upstreams it may be served and loaded on "
        "(docs/upstreams.md).",
    )

    @field_validator("ttl_s")
    @classmethod
    def _positive_ttls(cls, value: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = value.values() if isinstance(value, dict) else () if value is None else (value,)
        if any(not v > 0 for v in values):
            raise ValueError("expected TTLs above 0 seconds")
        return value

    @field_validator("preload", "keep_warm")
    @classmethod
    def _model_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not model or model != model.strip() for model in value):
            raise ValueError("expected model ids without surrounding spaces")
        return value


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a terminal, else JSON.")
    prompts: bool = Field(False, description="Include prompt text in logs.")
    pipeline_version: str | None = Field(None, description="Stamped on every log line (env EVAL_PIPELINE_VERSION).")


#: Upstream connections outside the concurrency slots besides loads, keep-warm and listed health
#: checks: the model-state refresh, the readiness probe, an admin unload, one LLM health check.
SIDE_CONNECTIONS = 4

# Doubling from 10 ms like the GenAI semantic conventions, continued past their 81.92 s to ~44 min:
# local prefill of a long prompt, or a model load, takes minutes.
DURATION_BUCKETS_S = tuple(round(0.01 * 2**n, 2) for n in range(19))


class MetricsConfig(Section):
    enabled: bool = Field(True, description="Serve GET /metrics (Prometheus text) and record request metrics.")
    duration_buckets_s: tuple[float, ...] = Field(
        DURATION_BUCKETS_S,
        description="Histogram buckets (seconds) for request duration, time to first token and queue wait.",
    )
    request_stream_usage: bool = Field(
        True,
        description="Ask the upstream for token usage on streams (stream_options.include_usage) when the client "
        "did not, and remove that extra frame before it reaches the client.",
    )
    max_models: int = Field(64, ge=1, description="Distinct model label values kept; further models count as 'other'.")

    @field_validator("duration_buckets_s")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(b <= a for a, b in pairwise(value)) or value[0] <= 0:
            raise ValueError("expected positive, strictly increasing bucket bounds")
        return value


class TracingConfig(Section):
    enabled: bool = Field(False, description="Export OpenTelemetry traces; off: nothing is instrumented.")
    exporter: Literal["otlp", "console"] = Field("otlp", description="otlp (HTTP/protobuf) or console (stdout).")
    endpoint: str | None = Field(
        None, description="OTLP traces URL; unset: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else localhost:4318."
    )
    service_name: str | None = Field(None, description="service.name; unset: OTEL_SERVICE_NAME, else 'lmgate'.")
    sample_ratio: float | None = Field(
        None, ge=0, le=1, description="Share of new traces kept (parent-based); unset: OTEL_TRACES_SAMPLER."
    )


class HealthConfig(Section):
    upstream_probe_ttl_s: float = Field(
        2.0, ge=0, description="Unused: /readyz no longer probes the upstream (it answers from known state); accepted."
    )
    probe_timeout_s: float = Field(
        2.0, gt=0, description="Unused: /readyz no longer probes the upstream (it answers from known state); accepted."
    )
    models: tuple[str, ...] = Field(
        (), description="Models /lmgate/health/llm checks with a 1-token generation; empty: those recently served."
    )
    llm_check_ttl_s: float = Field(10.0, ge=0, description="/lmgate/health/llm reuses its last result this long.")
    llm_check_timeout_s: float = Field(60.0, gt=0, description="Deadline of one model's 1-token check.")
    latency_window_s: float = Field(300.0, gt=0, description="Window of the rolling latency percentiles.")


class CacheConfig(Section):
    enabled: bool = Field(
        False, description="Answer repeated deterministic requests (temperature 0 or a seed, no tools) from memory."
    )
    max_entries: int = Field(
        500,
        ge=0,
        description="Answers kept, least recently used dropped first (env EVAL_CACHE_SIZE, which also turns the "
        "cache on above 0 unless `enabled` is set, off at 0).",
    )
    max_bytes: int = Field(64 * MiB, ge=1, description="Bytes of answers kept in all.")
    max_entry_bytes: int = Field(1 * MiB, ge=1, description="Larger answers are relayed but not kept.")
    ttl_s: float = Field(3600.0, gt=0, description="How long an answer is served from the cache.")


class StateConfig(Section):
    """Shared state for several replicas (docs/shared-state.md); without ``redis_url`` each replica decides alone."""

    redis_url: str | None = Field(
        None,
        description="Redis that replicas share decisions through (redis://, rediss:// or unix://); null: all state "
        "in memory, as for a single lmgate.",
    )
    timeout_ms: float = Field(
        250.0,
        gt=0,
        description="Deadline of each Redis call; past it the replica decides alone until Redis answers. Far above "
        "a loopback or LAN round trip (under 1 ms), so that an event-loop stall is not taken for an outage.",
    )
    lease_s: float = Field(
        10.0,
        gt=0,
        description="Lease of a shared slot, renewed while its request runs: a replica that dies frees its slots "
        "within this long.",
    )
    fallback_limit_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="While Redis is unavailable, the share of each concurrency limit a replica uses alone "
        "(at least 1 slot).",
    )
    key_prefix: str = Field("lmgate", description="Prefix of every Redis key lmgate writes (one per deployment).")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected a redis://, rediss:// or unix:// URL, like redis://127.0.0.1:6379/0")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("expected a host in the URL, like redis://127.0.0.1:6379/0")
        if parts.scheme == "unix" and not parts.path:
            raise ValueError("expected a socket path, like unix:///run/redis/redis.sock")
        try:
            parts.port  # noqa: B018 - a port that is not a number raises here
        except ValueError:
            raise ValueError("expected a numeric port, like redis://127.0.0.1:6379/0") from None
        if parts.scheme != "unix" and not re.fullmatch(r"(/\d*)?", parts.path):
            raise ValueError("expected a database number as the path, like redis://127.0.0.1:6379/0")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", value):
            raise ValueError("expected 1-64 letters, digits, '.', '_', ':' or '-'")
        return value

    @property
    def shared(self) -> bool:
        return self.redis_url is not None


class Config(Section):
    listen: ListenConfig = Field(default_factory=ListenConfig, description="Where lmgate listens.")
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig, description="The server lmgate forwards to.")
    upstreams: tuple[UpstreamConfig, ...] = Field(
        (),
        description="Several servers instead of `upstream`, each with a name; requests go where their model is "
        "loaded (docs/upstreams.md).",
    )
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig, description="Deadlines.")
    routes: RoutesConfig = Field(default_factory=RoutesConfig, description="What is forwarded and how.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Retries before the first byte.")
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig, description="Circuit breaker.")
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig, description="Concurrency limit and queue.")
    drain: DrainConfig = Field(default_factory=DrainConfig, description="Graceful shutdown.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Cold starts: model state, loads, heartbeats.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logs.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics.")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="OpenTelemetry traces.")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Readiness and LLM health checks.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Client keys and admin keys.")
    websockets: WebSocketsConfig = Field(
        default_factory=WebSocketsConfig, description="LM Studio's SDKs over WebSockets (docs/sdk.md)."
    )
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Response cache for deterministic requests.")
    state: StateConfig = Field(
        default_factory=StateConfig, description="State shared by several replicas through Redis (docs/shared-state.md)."
    )

    @model_validator(mode="after")
    def _one_way_to_name_upstreams(self) -> Config:
        # The example file spells `upstream:` out at its defaults; only a changed one conflicts.
        if self.upstreams and self.upstream != UpstreamConfig():
            raise ValueError(
                "both upstream and upstreams are set: use upstreams (a list, each with a name) for several servers, "
                "or upstream for one"
            )
        names = [upstream.name for upstream in self.upstream_list()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"upstreams: each name must be unique; repeated: {', '.join(repeated)}")
        for model, pinned in self.models.pin.items():
            unknown = [name for name in pinned if name not in names]
            if not pinned or unknown:
                raise ValueError(
                    f"models.pin.{model}: expected a list of upstream names among {', '.join(names)}"
                    + (f"; unknown: {', '.join(unknown)}" if unknown else "; got an empty list")
                )
        return self

    @model_validator(mode="after")
    def _pool_fits_the_concurrency_limit(self) -> Config:
        for upstream in self.upstream_list():
            explicit = upstream.pool.max_connections
            slots = self._concurrency_slots(upstream)
            if explicit is None or slots is None:
                continue
            key, limit, per_model = slots
            side = self.side_connections()
            where = "upstream" if not self.upstreams else f"upstreams.{upstream.name}"
            if explicit < limit + side:
                # A request past the pool would wait inside the HTTP client: outside the queue, its
                # bounds, its metrics and its Retry-After. Two limits, one of them invisible.
                raise ValueError(
                    f"{where}.pool.max_connections ({explicit}) is smaller than {key} ({limit}{per_model}) plus "
                    f"{side} connections for model loads, keep-warm pings, health checks and model-state refreshes: "
                    f"requests past the pool would wait unseen, outside the queue. Set {where}.pool.max_connections "
                    f"to at least {limit + side}, or remove it to have it derived from {key}."
                )
        return self

    def websocket_cap(self) -> int:
        """``websockets.max_open``, or four sockets per request the concurrency settings admit."""
        if self.websockets.max_open is not None:
            return self.websockets.max_open
        return 4 * (self.concurrency.limit + self.concurrency.max_queue)

    def upstream_list(self) -> tuple[UpstreamConfig, ...]:
        """Every upstream: ``upstreams``, or the single ``upstream`` section as a list of one."""
        return self.upstreams or (self.upstream,)

    def concurrency_for(self, upstream: UpstreamConfig) -> ConcurrencyConfig:
        """The ``concurrency`` section with ``upstream``'s own limits over it."""
        own = upstream.concurrency.model_dump(exclude_none=True)
        if not own:
            return self.concurrency
        merged = self.concurrency.model_copy(update=own)
        if merged.adaptive:  # an upstream's own limit widens the adaptive bounds rather than failing them
            merged = merged.model_copy(
                update={"min_limit": min(merged.min_limit, merged.limit), "max_limit": max(merged.max_limit, merged.limit)}
            )
        return merged

    def models_for(self, upstream: UpstreamConfig) -> ModelsConfig:
        """The ``models`` section as ``upstream`` applies it: preload and keep-warm only for the
        models that belong there (pinned to it; unpinned ones belong to the first upstream)."""
        first = self.upstream_list()[0].name

        def here(model: str) -> bool:
            return upstream.name in self.models.pin.get(model, (first,))

        models = self.models
        if len(self.upstream_list()) == 1:
            return models
        return models.model_copy(
            update={"preload": tuple(filter(here, models.preload)), "keep_warm": tuple(filter(here, models.keep_warm))}
        )

    def _concurrency_slots(self, upstream: UpstreamConfig) -> tuple[str, int, str] | None:
        """(key, requests it lets reach the upstream at once, ", per model" or ""); None: no limit."""
        c = self.concurrency_for(upstream)
        if not c.enabled:
            return None
        per_model = ", per model" if c.per_model else ""
        if c.adaptive:
            return "concurrency.max_limit", max(c.max_limit, c.limit), per_model
        key = "concurrency.limit" if upstream.concurrency.limit is None else f"upstreams.{upstream.name}.concurrency.limit"
        return key, c.limit, per_model

    def side_connections(self) -> int:
        """Upstream connections lmgate may open at once outside the concurrency slots.

        Model loads (``max_concurrent_loads``; preloads are loads), one keep-warm ping per
        ``keep_warm`` model, one LLM health check per ``health.models`` entry, plus
        ``SIDE_CONNECTIONS``: the model-state refresh, the readiness probe, an admin unload and a
        health check of a recently served model. Retries need none: an attempt's connection is
        released before the next attempt starts, within the same slot.
        """
        models = self.models
        return models.max_concurrent_loads + len(models.keep_warm) + len(self.health.models) + SIDE_CONNECTIONS

    def upstream_pool_connections(self, upstream: UpstreamConfig | None = None) -> int | None:
        """The upstream pool's size: ``upstream.pool.max_connections``, else derived from the limit.

        Derived: the requests the concurrency layer lets through at once plus
        :meth:`side_connections`, so that the queue stays the one place where requests wait. None
        (unbounded) where no total limit exists (concurrency off, or limits per model): the pool
        must not become a hidden limit there either.
        """
        upstream = upstream or self.upstream_list()[0]
        explicit = upstream.pool.max_connections
        if explicit is not None:
            return explicit
        slots = self._concurrency_slots(upstream)
        if slots is None or self.concurrency.per_model:
            return None
        return slots[1] + self.side_connections()

    def total_pool_connections(self) -> int | None:
        """Upstream connections of every upstream's pool together; None if any pool is unbounded."""
        pools = [self.upstream_pool_connections(upstream) for upstream in self.upstream_list()]
        return None if any(pool is None for pool in pools) else sum(pool for pool in pools if pool is not None)

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, secrets masked (for ``config check`` and logs)."""
        document = self.model_dump(mode="json")
        # A Redis URL may carry a password (redis://:secret@host, unix://...?password=secret).
        url = document["state"]["redis_url"]
        if url is not None:
            document["state"]["redis_url"] = re.sub(r"([?&]password=)[^&]*", r"\1***", _without_userinfo(url))
        return document

    def digest(self) -> str:
        """A short hash of the effective config, stamped on log lines to tell configs apart."""
        canonical = json.dumps(self.redacted(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _ms_to_s(value: str) -> float:
    return float(value) / 1000.0


# Environment variables LM Studio clients and eval pipelines already set, mapped to keys (name -> (key path, converter)).
CLIENT_ENV: dict[str, tuple[tuple[str, ...], Callable[[str], Any]]] = {
    "LLM_REQUEST_TIMEOUT_MS": (("timeouts", "first_token_s"), _ms_to_s),
    "LLM_MAX_RETRIES": (("retry", "max_retries"), int),
    "LLM_RETRY_BACKOFF_MS": (("retry", "backoff_base_s"), _ms_to_s),
    "EVAL_CONCURRENCY": (("concurrency", "limit"), int),
    "EVAL_PIPELINE_VERSION": (("logging", "pipeline_version"), str),
    "EVAL_CACHE_SIZE": (("cache", "max_entries"), int),
}
ENV_PREFIX = "LMGATE_"


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> Config:
    """Read, merge and validate the configuration; raise ``ConfigError`` naming what is wrong."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = _read_yaml(Path(path))
    for name, (key, convert) in CLIENT_ENV.items():
        if name in env:
            try:
                value = convert(env[name])
            except ValueError:
                raise ConfigError(f"environment variable {name}: got {env[name]!r}; expected a number") from None
            _set(raw, key, value)
            origins[key] = f"environment variable {name}"
    if "EVAL_CACHE_SIZE" in env:
        _switch_cache(raw, origins)
    for name, text in env.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            key = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            _set(raw, key, _parse_scalar(text))
            origins[key] = f"environment variable {name}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(raw, key, value)
            origins[key] = "command line"
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source, origins)) from None


def _switch_cache(raw: dict[str, Any], origins: dict[tuple[str, ...], str]) -> None:
    """``EVAL_CACHE_SIZE`` also switches the cache: an eval pipeline sets it because its cache is
    on with that many entries, so a user who sets it expects caching. A positive size turns the
    cache on unless the file says ``cache.enabled`` itself; 0 turns it off. A negative size is left
    for validation to reject, naming the variable."""
    cache = raw["cache"]
    size = cache["max_entries"]
    if size == 0:
        cache["enabled"] = False
    elif size > 0 and "enabled" not in cache:
        cache["enabled"] = True
    else:
        return
    origins[("cache", "enabled")] = "environment variable EVAL_CACHE_SIZE"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(document).__name__}")
    return document


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(raw: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    node = raw
    for part in key[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[key[-1]] = value


_SECRET_KEYS = frozenset({"api_key", "keys", "admin_keys"})


def _without_userinfo(value: Any) -> Any:
    return re.sub(r"//[^/@\s]*@", "//***@", value) if isinstance(value, str) else value


def _explain(exc: ValidationError, source: str, origins: Mapping[tuple[str, ...], str]) -> str:
    lines = []
    for error in exc.errors():
        location = tuple(str(part) for part in error["loc"])
        origin = source
        for length in range(len(location), 0, -1):
            if location[:length] in origins:
                origin = origins[location[:length]]
                break
        else:
            # A section-level error: name every non-file source that set a key inside it.
            inside = sorted({name for key, name in origins.items() if key[: len(location)] == location})
            if inside:
                origin = " and ".join([source, *inside]) if source != "defaults" else " and ".join(inside)
        key = ".".join(location) or "(top level)"
        reason = error["msg"].removeprefix("Value error, ")
        if not location and error["type"] == "value_error":
            lines.append(f"{origin}: {reason}")  # a check across sections names its own keys
            continue
        if error["type"] == "extra_forbidden":
            lines.append(f"{origin}: {key}: unknown key; check its spelling against `lmgate config schema`")
            continue
        value = error.get("input")
        # A misplaced secret (a plain key under auth.keys, a token of the wrong type) is never echoed.
        shown = "a value that is not shown" if _SECRET_KEYS & set(location) else repr(_without_userinfo(value))
        lines.append(f"{origin}: {key}: {reason[0].lower()}{reason[1:]} (got {shown})")
    return "invalid configuration:\n  " + "\n  ".join(lines)
