"""A faithful LM Studio simulator: its routes, bodies, SSE frames, errors, model lifecycle and
reaction to clients leaving, on a clock a test can drive. See docs/simulator.md.

    from gateway.simulator import Simulator, SimModel, SimSettings, FakeClock

    async with Simulator(models=[SimModel(id="qwen2.5-7b-instruct")], clock=FakeClock()) as sim:
        ...  # point the code under test at sim.url
"""

from __future__ import annotations

from gateway.simulator.clock import Clock, FakeClock, RealClock
from gateway.simulator.config import SimConfigError, SimulatorFile, load_file
from gateway.simulator.counters import Counters
from gateway.simulator.errors import SimError
from gateway.simulator.faults import FAULT_KINDS, Fault
from gateway.simulator.simulator import Simulator
from gateway.simulator.spec import SimModel, SimSettings, default_models

__all__ = [
    "FAULT_KINDS",
    "Clock",
    "Counters",
    "FakeClock",
    "Fault",
    "RealClock",
    "SimConfigError",
    "SimError",
    "SimModel",
    "SimSettings",
    "Simulator",
    "SimulatorFile",
    "default_models",
    "load_file",
]
