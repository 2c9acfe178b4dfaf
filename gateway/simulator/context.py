"""Everything a request handler needs from the simulator, in one object passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.simulator.clock import Clock
from gateway.simulator.counters import Counters
from gateway.simulator.faults import Faults
from gateway.simulator.models import ModelManager
from gateway.simulator.runtime import Runtime
from gateway.simulator.spec import SimSettings


@dataclass(frozen=True, eq=False)
class SimContext:
    settings: SimSettings
    clock: Clock
    counters: Counters
    faults: Faults
    manager: ModelManager
    runtime: Runtime
