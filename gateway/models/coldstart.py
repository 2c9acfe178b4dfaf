"""The cold-start layer: load a model that is not loaded before the request goes on, and say so.

It sits under the heartbeat layer and above concurrency and the timeout::

    HeartbeatMiddleware -> ColdStartMiddleware -> Concurrency -> Timeout -> Retry -> Breaker -> Proxy

so the load is waited for before the timeout layer starts its first-token clock (a 60 s load does
not eat a 45 s first-token deadline; ``models.load_timeout_s`` bounds it instead), the request does
not hold a concurrency slot while the model loads, and heartbeats cover the load.

For an inference request naming a model:

* **loaded** (the upstream's listing, refreshed when older than ``refresh_s``): forwarded at once,
  ``X-Lmgate-Model-State: warm``.
* **not loaded, loading or failed**: the request joins the model's single-flight load (or starts it)
  and is forwarded once the model is loaded, ``X-Lmgate-Model-State: cold`` and
  ``X-Lmgate-Load-Ms`` (how long this request waited for the load). A failed or timed-out load is
  ``502 model_load_failed`` with the upstream's message. A non-streaming request with
  ``models.on_loading: reject`` is answered ``503 model_loading`` with ``Retry-After`` set to the
  expected remaining load time, while the load goes on in the background.
* **unknown** (a plain OpenAI-compatible server, or a model the upstream does not list): forwarded
  untouched, ``X-Lmgate-Model-State: unknown``; the upstream loads it as it does, under heartbeats.

A client that leaves while the model loads ends its own request only; the load goes on for the
others (see ``gateway.models.loader``).

When the load outlasts ``models.heartbeat_s``, the heartbeat layer starts the response before
this layer's own start exists; :func:`early_headers` gives it ``X-Lmgate-Model-State`` for that
early start (``cold`` once the request joined a load, ``warm`` or ``unknown`` once forwarded), while
``X-Lmgate-Load-Ms``, known only when the load ends, reaches the client in the heartbeat layer's
comment carrying this layer's headers.

The layer publishes what the request is waiting for in ``scope["state"]``, from which
:func:`heartbeat_describer` builds the heartbeat text: ``: lmgate loading model=<id> elapsed_s=12
eta_s=30`` while the model loads, ``: lmgate waiting model=<id> elapsed_s=40`` after (queue,
prompt processing, a pause between tokens), and, with ``models.status_events``, an
``event: lmgate.status`` frame carrying the same as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import anyio

from gateway.models.errors import ModelLoadFailed, ModelLoading
from gateway.models.loader import Loader, LoadJob
from gateway.models.registry import ModelRecord, ModelRegistry
from gateway.request.routes import DONE_TERMINATED, INFERENCE_PATHS, route_path
from middleware.body import DEFAULT_LIMIT_BYTES, model_of, replaying_receive, request_json
from middleware.disconnect import cancel_on_disconnect
from middleware.errors import ClientDisconnected
from middleware.heartbeat import Describe, comment_frame, event_frame
from middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ColdStartMiddleware",
    "RequestPhase",
    "early_headers",
    "heartbeat_describer",
    "model_state",
]

#: Routes where an ``event: lmgate.status`` frame is safe: OpenAI-style chunk streams, whose clients
#: already skip chunks without ``choices`` (the usage chunk). The Responses and Messages SDKs
#: dispatch on event types and get comments only.
STATUS_EVENT_PATHS = DONE_TERMINATED
STATE_HEADER = b"x-lmgate-model-state"
LOAD_MS_HEADER = b"x-lmgate-load-ms"
#: Retry-After for ``on_loading: reject`` when no load of the model (or of any model) was seen yet.
UNKNOWN_ETA_RETRY_AFTER_S = 10.0
_PHASE_KEY = "lmgate.model_phase"


@dataclass(eq=False)
class RequestPhase:
    """What one request is waiting for (for its heartbeats), and how its model was found."""

    model: str
    job: LoadJob | None = None
    state: Literal["warm", "cold", "unknown"] | None = None
    waited_s: float | None = None  # cold: how long this request waited for the load
    registry: ModelRegistry | None = None  # the registry of the upstream the request went to


def request_phase(scope: Scope) -> RequestPhase | None:
    return (scope.get("state") or {}).get(_PHASE_KEY)


def model_state(scope: Scope) -> tuple[str, float | None] | None:
    """``(warm|cold|unknown, seconds waited for a load)`` for a request this layer handled.

    The same as the ``X-Lmgate-Model-State`` and ``X-Lmgate-Load-Ms`` headers, for layers further
    out that cannot see them when the heartbeat layer had to start the response first.
    """
    phase = request_phase(scope)
    if phase is None or phase.state is None:
        return None
    return phase.state, phase.waited_s


def early_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """``X-Lmgate-Model-State`` as far as it is known now, for a response started before this
    layer's own start (the heartbeat layer's ``start_headers``); empty while it is not known yet
    (the model's state is still being read from the upstream)."""
    phase = request_phase(scope)
    if phase is None:
        return []
    state = phase.state or ("cold" if phase.job is not None else None)
    return [(STATE_HEADER, state.encode("ascii"))] if state is not None else []


class ColdStartMiddleware:
    """Load before forwarding, single flight; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: ModelRegistry,
        loader: Loader,
        on_loading: Literal["wait", "reject"] = "wait",
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
    ) -> None:
        self.app = app
        self.registry = registry
        self.loader = loader
        self.on_loading = on_loading
        self.body_limit_bytes = body_limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or route_path(scope) not in INFERENCE_PATHS:
            await self.app(scope, receive, send)
            return
        model = await model_of(scope, receive, limit_bytes=self.body_limit_bytes)
        if model is None:
            await self.app(scope, replaying_receive(scope, receive), send)
            return
        phase = RequestPhase(model, registry=self.registry)
        scope.setdefault("state", {})[_PHASE_KEY] = phase
        await self.registry.refresh()
        # Unreachable upstream: stale knowledge would turn its failure into a misleading load error.
        record = self.registry.find(model) if self.registry.refresh_error is None else None
        if record is not None and record.listed is None and record.loading_since is None:
            # Heard of only through lmgate's own failed load (an admin load, a preload): the
            # upstream does not list it, so its own answer (400 model_not_found) is the right one.
            record = None
        if record is None:
            phase.state = "unknown"
            await self._forward(scope, receive, send, [(STATE_HEADER, b"unknown")])
            return
        record.in_flight += 1
        try:
            headers = await self._prepare(scope, receive, phase, record)
            await self._forward(scope, receive, send, headers)
        finally:
            record.in_flight -= 1
            self.registry.used(record)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        async def send_with_state(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
            await send(message)

        await self.app(scope, replaying_receive(scope, receive), send_with_state)

    async def _prepare(
        self, scope: Scope, receive: Receive, phase: RequestPhase, record: ModelRecord
    ) -> list[tuple[bytes, bytes]]:
        """Wait for the model to be loaded if it is not; the headers that say how it went."""
        state = self.registry.state(phase.model)
        if state in ("loaded", "unknown"):
            phase.state = "warm" if state == "loaded" else "unknown"
            return [(STATE_HEADER, phase.state.encode("ascii"))]
        arrived_at = anyio.current_time()
        job, created = self.loader.start(record.id)
        streaming = (request_json(scope) or {}).get("stream") is True
        if self.on_loading == "reject" and not streaming and self.loader.in_background:
            raise self._loading(job)  # the load goes on in the background for the retry
        phase.job = job
        record.waiting += 1
        try:
            await self._wait(job, created, scope, receive)
        finally:
            record.waiting -= 1
        if job.error is not None:
            raise ModelLoadFailed(job.error)
        phase.state, phase.waited_s = "cold", anyio.current_time() - arrived_at
        return [(STATE_HEADER, b"cold"), (LOAD_MS_HEADER, str(round(phase.waited_s * 1000)).encode("ascii"))]

    async def _wait(self, job: LoadJob, created: bool, scope: Scope, receive: Receive) -> None:
        """Wait for ``job``, watching for the client leaving (which ends this request only)."""
        # The body is read (model_of): the watch gets it replayed first, then the server's channel.
        async with cancel_on_disconnect(replaying_receive(scope, receive), scope=scope) as watch:
            await self.loader.wait(job, runner=created)
        if watch.disconnected:
            raise ClientDisconnected()

    def _loading(self, job: LoadJob) -> ModelLoading:
        elapsed = anyio.current_time() - (job.began_at or job.asked_at)
        remaining = self.registry.remaining_load_s(job.model, elapsed)
        retry_after = float(max(1, remaining)) if remaining is not None else UNKNOWN_ETA_RETRY_AFTER_S
        eta = f"; expected in about {math.ceil(retry_after)} s" if remaining is not None else ""
        return ModelLoading(f'The model "{job.model}" is loading{eta}. Try again then.', retry_after_s=retry_after)


def heartbeat_describer(*, status_events: bool = False) -> Describe:
    """The heartbeat frames for a request, from what :class:`ColdStartMiddleware` published."""

    def describe(scope: Scope, elapsed_s: float) -> bytes:
        phase = request_phase(scope)
        if phase is None:
            return comment_frame(f"lmgate waiting elapsed_s={_seconds(elapsed_s)}")
        job = phase.job
        fields: dict[str, object]
        if job is not None and not job.finished and phase.registry is not None:
            now = anyio.current_time()
            running_s = now - job.began_at if job.began_at is not None else 0.0
            fields = {
                "state": "loading",
                "model": phase.model,
                "elapsed_s": _seconds(now - job.asked_at),
                "eta_s": phase.registry.remaining_load_s(phase.model, running_s),
            }
        else:
            fields = {"state": "waiting", "model": phase.model, "elapsed_s": _seconds(elapsed_s)}
        text = " ".join(
            [f"lmgate {fields['state']}"]
            + [f"{key}={_token(value)}" for key, value in fields.items() if key != "state" and value is not None]
        )
        frame = comment_frame(text)
        if status_events and route_path(scope) in STATUS_EVENT_PATHS:
            # "choices": [] makes the frame an empty chunk to OpenAI SDKs, which skip it like the usage chunk.
            frame += event_frame("lmgate.status", {"object": "lmgate.status", **fields, "choices": []})
        return frame

    return describe


def _seconds(value: float) -> float | int:
    """Whole seconds from 10 s up, tenths below (a heartbeat every 0.2 s in tests stays readable)."""
    return round(value) if value >= 10 else round(value, 1)


def _token(value: object) -> str:
    """A value as one space-free token of the comment line."""
    return "".join(str(value).split()) or "-"
