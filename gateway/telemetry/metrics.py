"""Prometheus metrics, one ``CollectorRegistry`` per gateway, served at ``GET /metrics``.

Names follow the OpenTelemetry GenAI semantic conventions where they exist, written as OTel
names with their unit: a Prometheus that speaks UTF-8 names sees ``gen_ai.client.operation.duration_seconds``,
every other scraper the escaped ``gen_ai_client_operation_duration_seconds`` (what the OTel
Prometheus exporter would produce). Label names are the conventions' attributes
(``gen_ai.request.model`` -> ``gen_ai_request_model``).

Two kinds of series:

* observed per request by the telemetry layer (durations, tokens, errors, queue wait, model
  loads), recorded once when a request ends;
* read at scrape time from the layers' own state (retry counters, circuit states, concurrency
  slots and queues, draining) by :class:`StateCollector`, so the hot path pays nothing for them.

Model ids come from clients, so the ``gen_ai.request.model`` label keeps the first
``max_models`` distinct ids (configured health models first) and folds the rest into ``other``.
The ``upstream`` label names the upstream that served a request (from config, so bounded): with
one upstream always its name; with several, empty for requests lmgate answered without sending
them anywhere (a validation error, a cache hit, an unknown model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.telemetry.record import RequestOutcome, RequestRecord
from middleware.cache import CacheStore
from middleware.circuit_breaker import CircuitBreakerMiddleware
from middleware.concurrency import ConcurrencyMiddleware
from middleware.drain import DrainState
from middleware.retry import RetryMiddleware

_Labelled = TypeVar("_Labelled", Counter, Histogram, Gauge)

MODEL = "gen_ai.request.model"
OPERATION = "gen_ai.operation.name"
ROUTE = "http.route"
STATUS = "http.response.status_code"
ERROR_TYPE = "error.type"
UPSTREAM = "upstream"

# The GenAI conventions' token buckets (powers of 4).
TOKEN_BUCKETS = tuple(4.0**n for n in range(14))
# Time per output token: the conventions' buckets, continued for CPU-bound models.
PER_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
MODEL_LOAD_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 2400)
OTHER_MODELS = "other"


class ModelLabels:
    """Bounded label values for model ids: known ones as they are, the overflow as ``other``."""

    def __init__(self, limit: int, preset: Iterable[str] = ()) -> None:
        self.limit = limit
        self.known = set(preset)

    def __call__(self, model: str | None) -> str:
        if model is None:
            return ""
        if model in self.known:
            return model
        if len(self.known) < self.limit:
            self.known.add(model)
            return model
        return OTHER_MODELS


class GatewayMetrics:
    """The gateway's metrics and their registry; ``render`` answers a scrape."""

    def __init__(
        self,
        *,
        duration_buckets_s: Iterable[float],
        max_models: int = 64,
        models: Iterable[str] = (),
        info: dict[str, str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._children: dict[tuple[int, tuple[str | None, ...]], Any] = {}
        self.model_label = ModelLabels(max_models, models)
        buckets = tuple(duration_buckets_s)
        r = self.registry
        self.duration = Histogram(
            "gen_ai.client.operation.duration", "Request duration as the client sees it, every retry included.",
            [OPERATION, MODEL, ROUTE, STATUS, ERROR_TYPE, UPSTREAM], unit="seconds", buckets=buckets, registry=r,
        )
        self.ttft = Histogram(
            "gen_ai.server.time_to_first_token", "Request start to the first streamed body byte, successful streams.",
            [OPERATION, MODEL, ROUTE, UPSTREAM], unit="seconds", buckets=buckets, registry=r,
        )
        self.per_token = Histogram(
            "gen_ai.server.time_per_output_token", "Time per output token after the first, successful streams.",
            [OPERATION, MODEL], unit="seconds", buckets=PER_TOKEN_BUCKETS_S, registry=r,
        )
        self.tokens = Histogram(
            "gen_ai.client.token.usage", "Tokens per request from the upstream's usage report.",
            [OPERATION, MODEL, "gen_ai.token.type"], buckets=TOKEN_BUCKETS, registry=r,
        )
        self.tokens_counted = Counter(
            "lmgate.token.usage.counted",
            "Requests whose token count lmgate made itself, the upstream having reported none: "
            "counted (from the stream, or the upstream's tokenizer) or estimated (from the prompt's length).",
            ["gen_ai.token.type", "source"], registry=r,
        )
        self.tokens_per_second = Histogram(
            "lmgate.output.tokens_per_second", "Output tokens per second of generation (after the first token).",
            [MODEL, UPSTREAM], buckets=TOKENS_PER_SECOND_BUCKETS, registry=r,
        )
        self.errors = Counter(
            "lmgate.errors", "Failed requests by error category.", [ERROR_TYPE, MODEL, ROUTE, UPSTREAM], registry=r
        )
        self.in_flight = Gauge(
            "lmgate.requests.in_flight", "Requests inside lmgate now, queued ones included.", [MODEL], registry=r
        )
        self.queue_wait = Histogram(
            "lmgate.queue.wait", "Time from arrival to a concurrency slot.",
            [MODEL, UPSTREAM], unit="seconds", buckets=buckets, registry=r,
        )
        self.model_loads = Histogram(
            "lmgate.model.load.duration", "Model loads seen by lmgate, by outcome (the count is the number of loads).",
            [MODEL, "outcome", UPSTREAM], unit="seconds", buckets=MODEL_LOAD_BUCKETS_S, registry=r,
        )
        self.circuit_transitions = Counter(
            "lmgate.circuit.transitions", "Circuit breaker state changes, by the state entered.",
            ["circuit", "state", UPSTREAM], registry=r,
        )
        self.cache_requests = Counter(
            "lmgate.cache.requests", "Cacheable requests by result: hit, miss, or bypass (the client sent Cache-Control).",
            ["result"], registry=r,
        )
        if info:
            Info("lmgate.build", "Version, config hash and pipeline version of this process.", registry=r).info(info)

    def observe(self, record: RequestRecord, outcome: RequestOutcome) -> None:
        """Record one finished request."""
        model = self.model_label(record.model)
        operation = record.operation
        upstream = record.upstream or ""
        child = self._child
        child(self.duration, operation, model, record.route, str(outcome.status), outcome.category or "", upstream).observe(
            outcome.latency_s
        )
        if outcome.category is not None:
            child(self.errors, outcome.category, model, record.route, upstream).inc()
        if outcome.queue_wait_s is not None:
            child(self.queue_wait, model, upstream).observe(outcome.queue_wait_s)
        for kind, count in (("input", outcome.tokens_in), ("output", outcome.tokens_out)):
            if count is not None:
                child(self.tokens, operation, model, kind).observe(count)
                if record.usage_counted is not None:
                    child(self.tokens_counted, kind, record.usage_source(kind)).inc()
        if outcome.category is None:
            if outcome.ttft_s is not None:
                child(self.ttft, operation, model, record.route, upstream).observe(outcome.ttft_s)
            if outcome.time_per_token_s is not None:
                child(self.per_token, operation, model).observe(outcome.time_per_token_s)
            if outcome.tokens_per_s is not None:
                child(self.tokens_per_second, model, upstream).observe(outcome.tokens_per_s)

    def _child(self, metric: _Labelled, *values: str | None) -> _Labelled:
        """``metric.labels(*values)``, remembered: prometheus_client validates the values and takes
        a lock on every call (a few us each, up to seven a request). The label values are bounded
        (``model_label`` folds unknown models), so the memo is too."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def cache_result(self, result: str) -> None:
        """The response cache's ``on_result``: one count per cacheable request."""
        self.cache_requests.labels(result).inc()

    def watch_cache(self, store: CacheStore) -> None:
        """Expose the cache store's size at scrape time."""
        self.registry.register(CacheCollector(store))

    def watch_connections(self, connections: ClientConnections) -> None:
        """Expose the listener's client connections at scrape time (``lmgate serve`` calls this)."""
        self.registry.register(ConnectionCollector(connections))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format ``accept`` asks for (Prometheus text, or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


#: Seconds a WebSocket stays open: an SDK client keeps its sockets for its whole life.
SOCKET_DURATION_BUCKETS_S = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600)


class WebSocketMetrics:
    """The SDK sockets' series (gateway/proxy/websocket.py), in the gateway's registry.

    Labels are bounded: ``namespace`` is one of the SDK's paths, ``direction`` ``in`` (client to
    upstream) or ``out``, ``side`` who closed first (``client``, ``upstream`` or ``lmgate``), and
    ``code`` a standard close code or ``private`` (3000-4999).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.open = Gauge("lmgate.websockets.open", "SDK WebSockets open now.", ["namespace", UPSTREAM], registry=r)
        self.messages = Counter(
            "lmgate.websocket.messages", "Messages relayed, by direction (in: client to upstream).",
            ["namespace", "direction"], registry=r,
        )
        self.bytes = Counter(
            "lmgate.websocket.message", "Message payload relayed, by direction (in: client to upstream).",
            ["namespace", "direction"], unit="bytes", registry=r,
        )
        self.duration = Histogram(
            "lmgate.websocket.duration", "How long SDK WebSockets stayed open.",
            ["namespace"], unit="seconds", buckets=SOCKET_DURATION_BUCKETS_S, registry=r,
        )
        self.closes = Counter(
            "lmgate.websocket.closes", "Sockets closed, by the side that closed first and its close code.",
            ["namespace", "side", "code"], registry=r,
        )
        self.refused = Counter(
            "lmgate.websocket.refused", "Upgrades or auth packets refused, by reason.", ["reason"], registry=r
        )

    @staticmethod
    def code_label(code: int) -> str:
        return "private" if 3000 <= code <= 4999 else str(code)


@dataclass(frozen=True)
class WatchedUpstream:
    """One upstream's stateful layers, read at scrape time (None: that layer is off)."""

    retry: RetryMiddleware | None = None
    breaker: CircuitBreakerMiddleware | None = None
    concurrency: ConcurrencyMiddleware | None = None
    #: Whether it takes requests now (with several upstreams: the router's view); None: not known.
    reachable: Callable[[], bool] | None = None
    #: Its pooled connections: (carrying a request, idle); None: not known (httpx's own transport).
    connections: Callable[[], tuple[int, int]] | None = None


class RoutingStats(Protocol):
    """What the routing collector reads (gateway.upstreams.router.RouterStats)."""

    @property
    def chosen(self) -> Mapping[str, int]: ...
    @property
    def failovers(self) -> int: ...
    @property
    def second_instances(self) -> int: ...


class StateCollector:
    """Series read from the layers at scrape time, per upstream: retries, circuits, slots and
    queues; the router's decisions (several upstreams); the drain."""

    def __init__(
        self, *, upstreams: Mapping[str, WatchedUpstream], drain: DrainState, routing: RoutingStats | None = None
    ) -> None:
        self.upstreams = dict(upstreams)
        self.drain = drain
        self.routing = routing

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        yield from self._retries()
        yield from self._circuits()
        yield from self._concurrency()
        yield from self._routing()
        yield GaugeMetricFamily("lmgate.draining", "1 while shutting down.", value=1.0 if self.drain.draining else 0.0)
        in_flight = float(self.drain.in_flight)
        yield GaugeMetricFamily("lmgate.drain.in_flight", "Requests a drain waits for.", value=in_flight)

    def _retries(self) -> Iterator[Metric]:
        watched = [(name, w.retry) for name, w in self.upstreams.items() if w.retry is not None]
        if not watched:
            return
        families = {
            "attempts": CounterMetricFamily("lmgate.upstream.attempts", "Attempts sent upstream, retries included.",
                                            labels=[UPSTREAM]),
            "retries": CounterMetricFamily("lmgate.retries", "Retries (attempts after the first).", labels=[UPSTREAM]),
            "budget_exhausted": CounterMetricFamily("lmgate.retry.budget_exhausted",
                                                    "Retries refused by the retry budget.", labels=[UPSTREAM]),
        }
        for name, retry in watched:
            for field, family in families.items():
                family.add_metric([name], getattr(retry.stats, field))
        yield from families.values()

    def _circuits(self) -> Iterator[Metric]:
        watched = [(name, w.breaker) for name, w in self.upstreams.items() if w.breaker is not None]
        if not watched:
            return
        states = GaugeMetricFamily("lmgate.circuit.state", "1 for each circuit's current state.",
                                   labels=["circuit", "state", UPSTREAM])
        rejected = CounterMetricFamily("lmgate.circuit.rejected", "Requests shed by an open circuit.", labels=[UPSTREAM])
        for name, breaker in watched:
            for circuit, current in breaker.states().items():
                for state in ("closed", "open", "half_open"):
                    states.add_metric([circuit, state, name], 1.0 if state == current else 0.0)
            rejected.add_metric([name], breaker.rejected)
        yield states
        yield rejected

    def _concurrency(self) -> Iterator[Metric]:
        watched = [(name, w.concurrency) for name, w in self.upstreams.items() if w.concurrency is not None]
        reachable = [(name, w.reachable) for name, w in self.upstreams.items() if w.reachable is not None]
        if watched:
            families = {
                field: GaugeMetricFamily(f"lmgate.concurrency.{field}", help_text, labels=["key", UPSTREAM])
                for field, help_text in (
                    ("in_flight", "Requests holding a concurrency slot ('*': all models share the limit)."),
                    ("queued", "Requests waiting for a concurrency slot."),
                    ("limit", "The concurrency limit in force."),
                )
            }
            for name, concurrency in watched:
                for key, snapshot in concurrency.snapshot().items():
                    for field, family in families.items():
                        family.add_metric([key, name], float(snapshot[field]))
            yield from families.values()
        pools = [(name, w.connections) for name, w in self.upstreams.items() if w.connections is not None]
        if pools:
            connections = GaugeMetricFamily("lmgate.upstream.connections", "Connections to the upstream open now, "
                                            "carrying a request or idle in the pool.", labels=["state", UPSTREAM])
            for name, counts in pools:
                in_use, idle = counts()
                connections.add_metric(["in_use", name], float(in_use))
                connections.add_metric(["idle", name], float(idle))
            yield connections
        if reachable:
            up = GaugeMetricFamily("lmgate.upstream.reachable", "1 while the upstream takes requests (it answered its "
                                   "latest model-state refresh and no request failed to reach it since).",
                                   labels=[UPSTREAM])
            for name, is_reachable in reachable:
                up.add_metric([name], 1.0 if is_reachable() else 0.0)
            yield up

    def _routing(self) -> Iterator[Metric]:
        routing = self.routing
        if routing is None:
            return
        decisions = CounterMetricFamily("lmgate.routing.decisions", "Upstream choices by the routing rule that made "
                                        "them (each failover is another choice).", labels=["rule"])
        for rule, count in sorted(routing.chosen.items()):
            decisions.add_metric([rule], count)
        yield decisions
        yield CounterMetricFamily("lmgate.routing.failovers", "Requests moved to another upstream before the first byte.",
                                  value=routing.failovers)
        yield CounterMetricFamily("lmgate.routing.second_instances", "Loads of a model already loaded elsewhere "
                                  "(its upstreams were full for longer than a load takes).", value=routing.second_instances)


class CacheCollector:
    """The response cache's entries, bytes and evictions, read from its store at scrape time."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        yield GaugeMetricFamily("lmgate.cache.entries", "Answers in the response cache.", value=float(stats.entries))
        yield GaugeMetricFamily("lmgate.cache.size", "Answers in the response cache, in bytes.", value=float(stats.bytes),
                                unit="bytes")
        yield CounterMetricFamily("lmgate.cache.evictions", "Answers dropped to make room.", value=stats.evictions)


class ClientConnections(Protocol):
    """What the connection collector reads (gateway.server.connections.ConnectionLimiter)."""

    open: int
    max_connections: int | None
    evicted_total: int
    refused_total: int


class ConnectionCollector:
    """Client connections open, the cap, and those closed to stay under it, read at scrape time."""

    def __init__(self, connections: ClientConnections) -> None:
        self.connections = connections

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        c = self.connections
        yield GaugeMetricFamily("lmgate.client.connections", "Client connections open.", value=float(c.open))
        if c.max_connections is not None:
            yield GaugeMetricFamily("lmgate.client.connections.max", "The cap on client connections "
                                    "(listen.max_connections).", value=float(c.max_connections))
        yield CounterMetricFamily("lmgate.client.connections.evicted", "Idle client connections closed to make room "
                                  "for new ones at the cap or when descriptors ran out.", value=c.evicted_total)
        yield CounterMetricFamily("lmgate.client.connections.refused", "Client connections closed at once: at the cap "
                                  "with none idle.", value=c.refused_total)
