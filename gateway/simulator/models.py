"""The model lifecycle: not-loaded -> loading -> loaded -> not-loaded (research §2, checklist §7.2).

* **JIT load** on the first inference request for a downloaded model, taking ``load_delay_s`` of
  simulated time. Concurrent first requests share one load, unless ``duplicate_instance_race`` is
  on: then each starts its own and the model ends up loaded as ``key``, ``key:2``, ... (#1751).
* **Idle TTL**: a JIT-loaded instance gets the request's ``ttl`` (or ``default_ttl_s``) once, when
  it loads; it unloads after that long with no request in flight. The timer counts from the last
  request's start or end. Out-of-band loads have no TTL unless one is given (as ``lms load``).
* **Auto-Evict**: starting a JIT load unloads every *other* model's JIT-loaded instances, busy or
  not, killing their in-flight generations with "Model unloaded." (#671, #1796). Out-of-band loads
  are never evicted.
* **Unload** (out of band, REST, TTL, evict, fault) fails every request using the instance.

The manager is the single owner of this state; requests ask it for an instance and tell it when
they start and stop using one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio

from gateway.simulator import errors
from gateway.simulator.clock import Clock
from gateway.simulator.counters import Counters
from gateway.simulator.errors import SimError
from gateway.simulator.faults import Faults
from gateway.simulator.runtime import Runtime
from gateway.simulator.signals import Signals
from gateway.simulator.slots import Slots
from gateway.simulator.spec import SimModel, SimSettings

log = logging.getLogger("gateway.simulator")

UnloadReason = Literal["unload", "evict", "ttl", "fault"]


@dataclass(eq=False)
class Instance:
    """One loaded copy of a model, as ``lms ps`` lists it."""

    identifier: str
    model: SimModel
    context_length: int
    jit: bool
    ttl_s: float | None
    loaded_at: float  # simulated time the load finished
    last_used: float  # simulated time of the last request's start or end (the idle timer's origin)
    slots: Slots
    users: set[Signals] = field(default_factory=set)  # requests queued on or generating with it
    idle: anyio.Event | None = None  # set when the last user leaves (the TTL timer waits on it)
    timer: anyio.CancelScope | None = None  # the TTL timer, created when it starts (needs an event loop)
    unloaded: bool = False
    # The SDK protocol's ``instanceReference``: unique per load, unlike ``identifier`` (reused after an unload).
    reference: str = ""

    @property
    def status(self) -> str:
        return "generating" if self.slots.busy else "idle"


@dataclass
class Usage:
    """Set ``ended_at`` to the simulated time a request finished with its instance (default: now)."""

    ended_at: float | None = None


@dataclass(eq=False)
class Load:
    """A load under way; requests for the same model may wait on it together."""

    model: SimModel
    identifier: str
    jit: bool
    ttl_s: float | None
    context_length: int
    started_at: float  # taken when loads_started is counted, so a FakeClock test cannot race it
    fault_kind: str | None = None
    fault_message: str = ""
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    waiters: int = 0
    instance: Instance | None = None
    error: SimError | None = None


class ModelManager:
    def __init__(
        self,
        models: list[SimModel],
        *,
        settings: SimSettings,
        clock: Clock,
        counters: Counters,
        faults: Faults,
        runtime: Runtime,
    ) -> None:
        self.models = {model.id: model for model in models}
        if len(self.models) != len(models):
            raise ValueError("model ids must be unique")
        self.settings = settings
        self.clock = clock
        self.counters = counters
        self.faults = faults
        self.runtime = runtime
        self.instances: list[Instance] = []
        self.loads: list[Load] = []
        self._references = itertools.count(1)
        for model in models:
            if model.loaded:
                self._add_instance(
                    model, model.id, jit=False, ttl_s=None, context_length=model.loaded_context_length, at=clock.now()
                )

    # -- lookups ----------------------------------------------------------------------------

    def loaded(self, model: SimModel) -> list[Instance]:
        return [i for i in self.instances if i.model is model]

    def _least_busy(self, model: SimModel) -> Instance | None:
        candidates = self.loaded(model)
        return min(candidates, key=lambda i: len(i.users)) if candidates else None

    def resolve(self, name: str | None) -> tuple[SimModel, Instance | None]:
        """The model a request names and a loaded instance to serve it (None: it needs a JIT load).

        Raises LM Studio's errors: unknown model, or nothing loaded when JIT is off.
        """
        jit = self.settings.jit
        if not name:  # LM Studio answers a request without a model with whatever is loaded
            if self.instances:
                return self.instances[0].model, self.instances[0]
            raise errors.no_models_loaded()
        named = next((i for i in self.instances if i.identifier == name), None)  # "key:2" picks that one
        if named is not None:
            return named.model, named
        model = self.models.get(name)
        if model is not None:
            loaded = self._least_busy(model)
            if loaded is not None or (jit and model.jit):
                return model, loaded
        if not self.instances and (model is not None or not jit):
            raise errors.no_models_loaded()
        if not jit and self.settings.single_model_fallback and len(self.instances) == 1:
            return self.instances[0].model, self.instances[0]
        valid = list(self.models) if jit else [i.identifier for i in self.instances]
        raise errors.unknown_model(name, valid)

    # -- loading ----------------------------------------------------------------------------

    async def acquire(
        self, name: str | None, *, ttl_s: float | None, signals: Signals, abortable: bool
    ) -> Instance | None:
        """An instance to serve the request, JIT-loading it if needed; None if the client left
        while waiting for a load that ``abortable`` let it abandon."""
        model, instance = self.resolve(name)
        if instance is not None:
            return instance
        return await self.wait(self.jit_load(model, ttl_s=ttl_s), signals, abortable=abortable)

    def jit_load(self, model: SimModel, *, ttl_s: float | None) -> Load:
        """The JIT load of ``model`` under way, or a new one (TTL: ``ttl_s`` or ``default_ttl_s``)."""
        load = None if self.settings.duplicate_instance_race else self._pending_jit(model)
        if load is None:
            ttl = ttl_s if ttl_s is not None else self.settings.default_ttl_s
            load = self.start_load(model, jit=True, ttl_s=ttl, context_length=None)
        return load

    def _pending_jit(self, model: SimModel) -> Load | None:
        return next((load for load in self.loads if load.model is model and load.jit), None)

    def start_load(
        self,
        model: SimModel,
        *,
        jit: bool,
        ttl_s: float | None,
        context_length: int | None,
        identifier: str | None = None,
    ) -> Load:
        """Start loading ``model`` as ``identifier`` (default: its key, or ``key:2``... if taken)."""
        load = Load(
            model,
            identifier or self._next_identifier(model),
            jit,
            ttl_s,
            context_length or model.loaded_context_length,
            started_at=self.clock.now(),
        )
        fault = self.faults.take_load_fault(model.id)
        if fault is not None:
            load.fault_kind, load.fault_message = fault.kind, fault.params.get("message", "")
            self.counters.faults_applied += 1
        if jit and self.settings.auto_evict:
            for other in [i for i in self.instances if i.jit and i.model is not model]:
                self.unload(other, reason="evict")
        self.loads.append(load)
        self.runtime.spawn(self._run_load, load)
        self.counters.loading += 1
        self.counters.loads_started += 1
        return load

    async def load(
        self, name: str, *, ttl_s: float | None = None, context_length: int | None = None
    ) -> tuple[Instance, float]:
        """An out-of-band load (``lms load``, ``POST /api/v1/models/load``): never JIT, never
        evicted, a new instance (``key:2``) if the model is already loaded. Returns the instance and
        the simulated load time in seconds."""
        model = self.models.get(name)
        if model is None:
            raise errors.no_such_model(name)
        if context_length is not None and not 0 < context_length <= model.max_context_length:
            raise errors.invalid_parameter("context_length", f"between 1 and {model.max_context_length}")
        load = self.start_load(model, jit=False, ttl_s=ttl_s, context_length=context_length)
        try:
            instance = await self.wait(load, None, abortable=False)
        except SimError as error:
            # The REST API's error object (exact JSON not captured; see docs/simulator.md).
            raise errors.rest_error(400, error.message, type_="internal_error", code="model_load_failed") from None
        assert instance is not None
        return instance, instance.loaded_at - load.started_at

    def identifier_taken(self, identifier: str) -> bool:
        return any(i.identifier == identifier for i in self.instances) or any(
            load.identifier == identifier for load in self.loads
        )

    async def wait(self, load: Load, signals: Signals | None, *, abortable: bool) -> Instance | None:
        """Wait for ``load`` to finish; None if ``signals`` says the client left first. With
        ``abortable``, the load stops when its last waiter leaves. Raises the load's error."""
        load.waiters += 1
        try:
            if signals is None:
                await load.done.wait()
            else:
                with signals.phase(on_disconnect=abortable):
                    await load.done.wait()
        finally:
            load.waiters -= 1
            if abortable and load.waiters == 0 and not load.done.is_set():
                load.scope.cancel()  # the last client waiting for it left: abort, as Ollama does
        if not load.done.is_set():
            return None
        if load.error is not None:
            raise load.error
        assert load.instance is not None
        if load.instance.unloaded:
            raise errors.model_unloaded()
        return load.instance

    async def _run_load(self, load: Load) -> None:
        with load.scope:
            if load.fault_kind == "load_hang":
                await anyio.sleep_forever()
            await self.clock.sleep_until(load.started_at + load.model.load_delay_s)
        self.loads.remove(load)
        self.counters.loading -= 1
        model = load.model
        if load.scope.cancelled_caught:
            load.error = errors.load_failed(model.id, "Operation canceled.")
            self.counters.loads_aborted += 1
        elif load.fault_kind == "load_failure":
            load.error = errors.load_failed(model.id, load.fault_message)
            self.counters.loads_failed += 1
        else:
            load.instance = self._add_instance(
                model,
                load.identifier,
                jit=load.jit,
                ttl_s=load.ttl_s,
                context_length=load.context_length,
                at=load.started_at + model.load_delay_s,
            )
            self.counters.loads_completed += 1
        load.done.set()

    def _next_identifier(self, model: SimModel) -> str:
        identifier, n = model.id, 1
        while self.identifier_taken(identifier):
            n += 1
            identifier = f"{model.id}:{n}"
        return identifier

    def _add_instance(
        self, model: SimModel, identifier: str, *, jit: bool, ttl_s: float | None, context_length: int, at: float
    ) -> Instance:
        instance = Instance(identifier, model, context_length, jit, ttl_s, at, at, Slots(model.parallel))
        instance.reference = f"sim-instance-{next(self._references)}"
        self.instances.append(instance)
        self._count_instances()
        if ttl_s is not None:
            self.runtime.spawn(self._expire_when_idle, instance)
        log.debug("loaded %s (jit=%s, ttl=%s)", identifier, jit, ttl_s)
        return instance

    # -- use, TTL, unload ---------------------------------------------------------------------

    @contextmanager
    def use(self, instance: Instance, signals: Signals, *, at: float) -> Iterator[Usage]:
        """Mark a request as using ``instance`` from simulated time ``at``: it resets the idle timer
        (at its start and at its end) and dies with the instance."""
        if instance.unloaded:
            raise errors.model_unloaded()
        if not instance.users:
            instance.idle = anyio.Event()
        instance.users.add(signals)
        instance.last_used = max(instance.last_used, at)
        usage = Usage()
        try:
            yield usage
        finally:
            instance.users.discard(signals)
            ended = usage.ended_at if usage.ended_at is not None else self.clock.now()
            instance.last_used = max(instance.last_used, ended)
            if not instance.users and instance.idle is not None:
                instance.idle.set()

    async def _expire_when_idle(self, instance: Instance) -> None:
        assert instance.ttl_s is not None
        instance.timer = anyio.CancelScope()
        if instance.unloaded:
            return
        with instance.timer:
            while True:
                if instance.users and instance.idle is not None:
                    await instance.idle.wait()
                    continue
                deadline = instance.last_used + instance.ttl_s
                if self.clock.now() >= deadline:
                    self.unload(instance, reason="ttl")
                    return
                await self.clock.sleep_until(deadline)

    def unload(self, instance: Instance, *, reason: UnloadReason) -> None:
        if instance.unloaded:
            return
        instance.unloaded = True
        self.instances.remove(instance)
        if instance.timer is not None:
            instance.timer.cancel()
        for signals in list(instance.users):
            signals.model_unloaded()
        self._count_instances()
        if reason == "evict":
            self.counters.evictions += 1
        elif reason == "ttl":
            self.counters.ttl_unloads += 1
        else:
            self.counters.unloads += 1
        log.debug("unloaded %s (%s)", instance.identifier, reason)

    def unload_named(self, name: str, *, reason: UnloadReason = "unload") -> list[str]:
        """Unload an instance by identifier, or every instance of a model key; with nothing loaded
        under that name, abort the loads under way for it instead (a hung load ends this way).
        Returns the identifiers affected."""
        matches = [i for i in self.instances if i.identifier == name]
        matches = matches or [i for i in self.instances if i.model.id == name]
        for instance in matches:
            self.unload(instance, reason=reason)
        aborted = [] if matches else [load for load in self.loads if name in (load.model.id, load.identifier)]
        for load in aborted:
            load.scope.cancel()
        return [i.identifier for i in matches] + [load.identifier for load in aborted]

    def _count_instances(self) -> None:
        counts: dict[str, int] = {}
        for instance in self.instances:
            counts[instance.model.id] = counts.get(instance.model.id, 0) + 1
        self.counters.instances = counts
