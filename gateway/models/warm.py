"""Warm models stay warm: preload at start-up, keep-warm pings, and the periodic state refresh.

* **Preload** (``models.preload``): each model is loaded at start-up (retried with backoff while it
  fails); readiness stays 503 until every one has been loaded once, so a load balancer sends no
  traffic to an instance whose pinned models are still loading.
* **Keep-warm** (``models.keep_warm``): LM Studio unloads a model after its idle TTL (60 min by
  default for JIT loads). For each pinned model lmgate sends a one-token request once the model has
  been idle for half its TTL (``ttl_s`` for it, else ``assumed_ttl_s``), which resets LM Studio's
  idle timer; a pinned model that a refresh finds unloaded (evicted, unloaded by hand) is loaded
  again at once.
  Idle means no request through lmgate, so a busy model is never pinged.
* **Refresh**: with pinned models, the upstream's listing is re-read every ``refresh_s``, so an
  unloaded pinned model is noticed; otherwise state is read on demand only (a request or
  ``GET /lmgate/models`` finding it older than ``refresh_s``), and an idle gateway stays quiet.

All timing here is on the service's clock, so a test can run a simulated day in a second.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import anyio

from gateway.models.clock import Clock
from gateway.models.loader import Loader
from gateway.models.registry import ModelRegistry
from gateway.models.upstream import Listed, LoadError, UpstreamModels

logger = logging.getLogger("lmgate.models")

_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0


class Warmer:
    """Runs the preload, keep-warm and refresh tasks; see the module docstring."""

    def __init__(
        self,
        registry: ModelRegistry,
        loader: Loader,
        upstream: UpstreamModels,
        *,
        clock: Clock,
        preload: Sequence[str] = (),
        keep_warm: Sequence[str] = (),
        ping_after_s: Callable[[str], float],
        ttl_for: Callable[[str], float | None] = lambda model: None,
    ) -> None:
        self.registry = registry
        self.loader = loader
        self.upstream = upstream
        self.clock = clock
        self.preload = tuple(dict.fromkeys(preload))
        self.keep_warm = tuple(dict.fromkeys(keep_warm))
        self.ping_after_s = ping_after_s
        self.ttl_for = ttl_for
        self.pending = set(self.preload)  # preload models not loaded yet
        self.pings = 0
        self._preloaded = anyio.Event()
        if not self.pending:
            self._preloaded.set()

    @property
    def ready(self) -> bool:
        """Every preload model has been loaded once (True without preload)."""
        return self._preloaded.is_set()

    async def wait_ready(self) -> None:
        await self._preloaded.wait()

    async def run(self) -> None:
        """Run every task until cancelled (the gateway's lifespan ends)."""
        if not (self.preload or self.keep_warm):
            return  # state is then read on demand only: an idle gateway does not poll the upstream
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refresh_forever)
            for model in self.preload:
                tg.start_soon(self._preload, model)
            for model in self.keep_warm:
                tg.start_soon(self._keep_warm, model)

    async def _refresh_forever(self) -> None:
        while True:
            await self.registry.refresh()
            await self.clock.sleep_until(self.registry.fresh_until or self.clock.now() + self.registry.refresh_s)

    async def _preload(self, model: str) -> None:
        await self._ensure_loaded(model, load_unknown=True)
        self.pending.discard(model)
        if not self.pending:
            logger.info("preload finished", extra={"event": "models_preloaded", "models": list(self.preload)})
            self._preloaded.set()

    async def _ensure_loaded(self, model: str, *, load_unknown: bool) -> None:
        """Load ``model`` unless it is loaded, retrying with backoff until a load succeeds.

        ``load_unknown``: also load when the upstream cannot say (a one-token request does it).
        """
        delay = _RETRY_FIRST_S
        while True:
            await self.registry.refresh()
            state = self.registry.state(model)
            if state == "loaded" or (state == "unknown" and not load_unknown):
                return
            job = await self.loader.load(model)
            if job.error is None:
                return
            await self.clock.sleep_until(self.clock.now() + delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    async def _keep_warm(self, model: str) -> None:
        ping_after = self.ping_after_s(model)
        while True:
            await self._ensure_loaded(model, load_unknown=False)
            record = self.registry.record(model)
            if record.last_used is None or self.clock.now() - record.last_used >= ping_after:
                await self._ping(model)
            due = (record.last_used if record.last_used is not None else self.clock.now()) + ping_after
            await self._sleep_until_or_unloaded(model, due)

    async def _sleep_until_or_unloaded(self, model: str, deadline: float) -> None:
        """Sleep until ``deadline``, or until a refresh shows ``model`` unloaded (evicted, ``lms unload``)."""
        async with anyio.create_task_group() as tg:

            async def until_deadline() -> None:
                await self.clock.sleep_until(deadline)
                tg.cancel_scope.cancel()

            tg.start_soon(until_deadline)
            await self.registry.wait_for(lambda registry: registry.state(model) in ("not-loaded", "failed"), math.inf)
            tg.cancel_scope.cancel()

    async def _ping(self, model: str) -> None:
        record = self.registry.record(model)
        try:
            await self.upstream.warm_up(record.listed or Listed(model), ttl_s=self.ttl_for(model))
        except LoadError as exc:
            logger.warning("keep-warm of %s failed: %s", model, exc.message, extra={"event": "keep_warm_failed", "model": model})
        else:
            self.pings += 1
        self.registry.used(record)  # last: it wakes registry watchers, who then see the ping counted
