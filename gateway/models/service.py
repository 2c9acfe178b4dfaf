"""``ModelService``: the registry, loader and warmer of one upstream, built from ``models:``.

The gateway creates one; its request layers (``HeartbeatMiddleware`` with the cold-start
heartbeat text, and ``ColdStartMiddleware``) are built from its parts in
``gateway.stack.build_stack``, outside concurrency and the timeout. The gateway runs
:meth:`ModelService.running` for the life of its ASGI lifespan (background loads, refresh,
preload, keep-warm); ``gateway.models.admin`` serves :meth:`ModelService.snapshot`, :meth:`load`
and :meth:`unload` on ``/lmgate/models``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import httpx

from gateway.config.settings import Config, ModelsConfig
from gateway.models.clock import Clock, MonotonicClock
from gateway.models.errors import ModelLoadFailed
from gateway.models.loader import Loader, LoadJob
from gateway.models.registry import ModelRegistry
from gateway.models.upstream import UpstreamModels
from gateway.models.warm import Warmer

logger = logging.getLogger("lmgate.models")


class LoadObserver(Protocol):
    """Called once per load lmgate made (success or failure), e.g. ``Telemetry.model_load``."""

    def __call__(self, model: str, load_s: float, *, ok: bool, error: str | None) -> None: ...


class ModelService:
    """Everything lmgate knows and does about the models of one upstream."""

    def __init__(
        self,
        options: ModelsConfig,
        *,
        client: httpx.AsyncClient,
        upstream_url: str,
        api_key: str | None = None,
        clock: Clock | None = None,
        on_load: LoadObserver | None = None,
    ) -> None:
        self.options = options
        self.on_load = on_load
        self.clock = clock or MonotonicClock()
        self.upstream = UpstreamModels(client, upstream_url, api_key=api_key, load_method=options.load_method)
        self.registry = ModelRegistry(
            self.upstream, clock=self.clock, refresh_s=options.refresh_s, pinned=(*options.preload, *options.keep_warm)
        )
        self.loader = Loader(
            self.registry,
            self.upstream,
            max_concurrent=options.max_concurrent_loads,
            timeout_s=options.load_timeout_s,
            ttl_for=self.ttl_for,
            on_finished=self._load_finished,
        )
        self.warmer = Warmer(
            self.registry,
            self.loader,
            self.upstream,
            clock=self.clock,
            preload=options.preload if options.enabled else (),
            keep_warm=options.keep_warm if options.enabled else (),
            ping_after_s=lambda model: (self.ttl_for(model) or options.assumed_ttl_s) / 2,
            ttl_for=self.ttl_for,
        )

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        client: httpx.AsyncClient,
        api_key: str | None = None,
        clock: Clock | None = None,
        on_load: LoadObserver | None = None,
    ) -> ModelService:
        return cls(config.models, client=client, upstream_url=config.upstream.url, api_key=api_key, clock=clock, on_load=on_load)

    def _load_finished(self, job: LoadJob) -> None:
        """Tell the observer (telemetry: metrics and the ``model_load`` log line) about one load."""
        if self.on_load is None:
            return
        seconds = job.seconds if job.seconds is not None else anyio.current_time() - (job.began_at or job.asked_at)
        try:
            self.on_load(job.model, seconds, ok=job.error is None, error=job.error)
        except Exception:  # an observer's fault must not fail the load, nor the loads' task group
            logger.exception("the load observer failed for model %s", job.model, extra={"event": "models_observer_failed"})

    def ttl_for(self, model: str) -> float | None:
        """The idle TTL lmgate asks for when it loads or warms ``model`` (None: the upstream's rule)."""
        ttl = self.options.ttl_s
        if isinstance(ttl, Mapping):
            return ttl.get(model)
        return ttl

    # -- the request path -----------------------------------------------------------------------

    async def model_info(self, model: str) -> dict[str, Any] | None:
        """``model_info`` for an ``/api/v0`` answer lmgate assembled (its stream carries none).

        From the registry's listing where it knows the model and its loaded context; otherwise
        ``GET /api/v0/models/{model}`` (cold starts off, a stale listing, a model loaded since).
        """
        known = self.registry.facts(model)
        if known is None or known.context_length is None:
            known = await self.upstream.model_facts(model) or known
        return (known.model_info() or None) if known is not None else None

    # -- background tasks -----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Own loads, refresh, preload and keep-warm for the block (the gateway's lifespan)."""
        if not self.options.enabled:
            yield
            return
        async with anyio.create_task_group() as tg:
            self.loader.attach(tg)
            tg.start_soon(self.warmer.run)
            try:
                yield
            finally:
                self.loader.detach()
                tg.cancel_scope.cancel()

    @property
    def ready(self) -> bool:
        """Every ``models.preload`` model has been loaded once."""
        return self.warmer.ready

    async def wait_ready(self) -> None:
        await self.warmer.wait_ready()

    # -- admin ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ``GET /lmgate/models`` document."""
        registry = self.registry
        now = anyio.current_time()
        models = [
            registry.describe(
                record,
                now=now,
                extra={
                    "preload": record.id in self.options.preload,
                    "keep_warm": record.id in self.options.keep_warm,
                    "ttl_s": self.ttl_for(record.id),
                },
            )
            for record in sorted(registry.records.values(), key=lambda r: r.id)
        ]
        self._show_elsewhere(models)
        return {
            "upstream": self.upstream.url,
            "api": self.upstream.api,
            "refreshed_s_ago": round(self.clock.now() - registry.refreshed_at, 1) if registry.refreshed_at is not None else None,
            "refresh_error": registry.refresh_error,
            "ready": self.ready,
            "preload_pending": sorted(self.warmer.pending),
            "loads": {
                "in_progress": self.loader.loading,  # other replicas' loads too (shared state)
                "max_concurrent": self.loader.max_concurrent,
                "timeout_s": self.loader.timeout_s,
            },
            "models": models,
        }

    def _show_elsewhere(self, models: list[dict[str, Any]]) -> None:
        """Mark the models another replica is loading (shared state) as loading here too."""
        elsewhere = self.loader.shared.elsewhere() if self.loader.shared is not None else {}
        for entry in models:
            load = elsewhere.get(entry["id"])
            if load is not None and entry["loading"] is None:
                eta = max(0, math.ceil(load.expected_s - load.elapsed_s)) if load.expected_s is not None else None
                entry["state"] = "loading"
                entry["loading"] = {"elapsed_s": round(load.elapsed_s, 1), "eta_s": eta, "replica": load.owner}

    async def load(self, model: str) -> LoadJob | None:
        """Load ``model`` unless it is loaded (None then); raises ``ModelLoadFailed``."""
        await self.registry.refresh(force=True)
        if self.registry.state(model) == "loaded":
            return None
        job = await self.loader.load(model)
        if job.error is not None:
            raise ModelLoadFailed(job.error)
        return job

    async def unload(self, model: str) -> list[str]:
        """Unload every instance of ``model``; returns their ids (raises ``ModelApiError``)."""
        await self.registry.refresh(force=True)
        record = self.registry.find(model)
        instances = list(record.listed.instances) if record is not None and record.listed is not None else []
        if record is not None and record.id != model and model in instances:
            instances = [model]  # one instance named directly
        for instance in instances:
            await self.upstream.unload(instance)
        if instances:
            await self.registry.refresh(force=True)
        return instances
