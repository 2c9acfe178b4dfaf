"""The public entry point: ``async with Simulator(...) as sim`` serves a simulated LM Studio.

    async with Simulator(models=[SimModel(id="qwen2.5-7b-instruct", load_delay_s=5.0)],
                         clock=FakeClock()) as sim:
        sim.url                  # http://127.0.0.1:<free port>
        sim.clock.advance(5.0)   # the JIT load completes
        await sim.wait_for(lambda c: c.loads_completed == 1)

The simulator runs on hypercorn in the caller's event loop (``gateway.server.serving``), so tests drive it
over real sockets. ``serve=False`` skips the server for in-process use of ``sim.app``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

from gateway.server.serving import serve_in_background
from gateway.simulator.app import SimulatorApp
from gateway.simulator.clock import Clock, RealClock
from gateway.simulator.context import SimContext
from gateway.simulator.control import ControlAPI, state
from gateway.simulator.counters import Counters
from gateway.simulator.faults import Fault, Faults
from gateway.simulator.models import ModelManager
from gateway.simulator.runtime import Runtime
from gateway.simulator.spec import SimModel, SimSettings, default_models


class Simulator:
    """A simulated LM Studio server with its counters, clock, faults and settings at hand."""

    def __init__(
        self,
        models: Iterable[SimModel] | None = None,
        settings: SimSettings | None = None,
        clock: Clock | None = None,
        control: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        serve: bool = True,
        graceful_timeout_s: float = 1.0,
    ) -> None:
        self.settings = settings if settings is not None else SimSettings()
        # Typed Any so a test can call ``sim.clock.advance`` on its FakeClock without a cast.
        self.clock: Any = clock if clock is not None else RealClock()
        self.counters = Counters()
        self.faults = Faults()
        self.runtime = Runtime()
        self.manager = ModelManager(
            list(models) if models is not None else default_models(),
            settings=self.settings,
            clock=self.clock,
            counters=self.counters,
            faults=self.faults,
            runtime=self.runtime,
        )
        self.context = SimContext(self.settings, self.clock, self.counters, self.faults, self.manager, self.runtime)
        self.app = SimulatorApp(self.context, control=ControlAPI(self.context) if control else None)
        self.host = host
        self.port = port
        self.url = ""
        self._serve = serve
        self._graceful_timeout_s = graceful_timeout_s
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Simulator:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await stack.enter_async_context(self.runtime.run())
            if self._serve:
                server = await stack.enter_async_context(
                    serve_in_background(
                        self.app, host=self.host, port=self.port, graceful_timeout_s=self._graceful_timeout_s
                    )
                )
                self.url, self.port = server.url, server.port
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        # End hung requests first, so the server's graceful shutdown has nothing to wait for.
        self.runtime.stop_requests()
        stack, self._stack = self._stack, None
        if stack is not None:
            return await stack.__aexit__(exc_type, exc, tb)
        return None

    async def wait_for(self, predicate: Callable[[Counters], bool], timeout: float = 5.0) -> None:
        """Wait (event-driven, no polling) until ``predicate(sim.counters)``; TimeoutError after ``timeout`` s."""
        await self.counters.wait_for(predicate, timeout)

    def inject_fault(self, kind: str, count: int = 1, *, model: str | None = None, **params: Any) -> Fault:
        """Queue a fault for the next ``count`` matching requests (or loads); see faults.py for kinds."""
        return self.faults.inject(kind, count, model=model, **params)

    def clear_faults(self) -> None:
        self.faults.clear()

    async def load_model(self, model: str, *, ttl_s: float | None = None, context_length: int | None = None) -> str:
        """Load out of band, as ``lms load`` does (no TTL unless given; never auto-evicted).
        Takes the model's load delay on the simulator's clock; returns the instance id."""
        instance, _ = await self.manager.load(model, ttl_s=ttl_s, context_length=context_length)
        return instance.identifier

    async def unload_model(self, name: str) -> list[str]:
        """Unload a model's instances (or one instance by id), as ``lms unload``; in-flight
        requests on them fail with "Model unloaded.". Raises LookupError if nothing matched."""
        unloaded = self.manager.unload_named(name)
        if not unloaded:
            raise LookupError(f"nothing loaded under {name!r}")
        return unloaded

    def state(self) -> dict[str, Any]:
        """Clock, loaded instances (like ``lms ps``), loads under way, pending faults, settings."""
        return state(self.context)
