"""The private control API under ``/__sim/`` (a prefix LM Studio does not use).

Off unless ``Simulator(control=True)`` or ``lmgate simulate --control``: a demo simulator answers
``/__sim/...`` exactly as LM Studio answers any unknown route. Meant for tests written in other
languages or processes, which cannot reach the Python object:

    GET    /__sim/counters                 the counters (Counters.snapshot())
    GET    /__sim/state                    clock, loaded instances (like `lms ps`), loads, faults, settings
    POST   /__sim/clock/advance            {"seconds": 60}           FakeClock only (409 otherwise)
    POST   /__sim/models/load              {"model", "ttl"?, "context_length"?}   as `lms load`
    POST   /__sim/models/unload            {"model"}  a model key (all its instances) or an instance id
    GET    /__sim/faults                   pending faults
    POST   /__sim/faults                   {"kind", "count"?, "model"?, ...parameters}
    DELETE /__sim/faults                   drop pending faults
    GET    /__sim/settings
    PATCH  /__sim/settings                 {"jit": false, ...} validated, applied at once

Errors are ``{"error": "..."}`` with 400, 404 or 409.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.simulator import catalog
from gateway.simulator.app import optional_positive, required_string
from gateway.simulator.clock import FakeClock
from gateway.simulator.config import SimConfigError, update_settings
from gateway.simulator.context import SimContext
from gateway.simulator.errors import SimError
from gateway.simulator.http import Exchange

Action = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def state(ctx: SimContext) -> dict[str, Any]:
    return {
        "now": ctx.clock.now(),
        "instances": catalog.processes(ctx.manager),
        "loading": [load.identifier for load in ctx.manager.loads],
        "faults": [fault.as_dict() for fault in ctx.faults.pending],
        "settings": ctx.settings.as_dict(),
    }


class ControlAPI:
    def __init__(self, ctx: SimContext) -> None:
        self.ctx = ctx
        self.routes: dict[tuple[str, str], Action] = {
            ("GET", "counters"): self._counters,
            ("GET", "state"): self._state,
            ("POST", "clock/advance"): self._advance,
            ("POST", "models/load"): self._load,
            ("POST", "models/unload"): self._unload,
            ("GET", "faults"): self._faults,
            ("POST", "faults"): self._inject,
            ("DELETE", "faults"): self._clear_faults,
            ("GET", "settings"): self._settings,
            ("PATCH", "settings"): self._patch_settings,
        }

    async def __call__(self, exchange: Exchange, raw: bytes) -> None:
        action = self.routes.get((exchange.method, exchange.path.removeprefix("/__sim/").strip("/")))
        try:
            if action is None:
                raise ControlError(404, f"no control endpoint {exchange.method} {exchange.path}")
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError as exc:
                raise ControlError(400, f"invalid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise ControlError(400, "the body must be a JSON object")
            result = await action(body)
        except ControlError as exc:
            await exchange.respond(exc.status, {"error": str(exc)})
            return
        await exchange.respond(200, result)

    async def _counters(self, body: dict[str, Any]) -> Any:
        return self.ctx.counters.snapshot()

    async def _state(self, body: dict[str, Any]) -> Any:
        return state(self.ctx)

    async def _advance(self, body: dict[str, Any]) -> Any:
        clock = self.ctx.clock
        if not isinstance(clock, FakeClock):
            raise ControlError(409, "the clock is real time; start the simulator with a FakeClock to advance it")
        seconds = body.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ControlError(400, '"seconds" must be a number >= 0')
        clock.advance(float(seconds))
        return {"now": clock.now()}

    async def _load(self, body: dict[str, Any]) -> Any:
        try:
            name = required_string(body, "model")
            ttl_s = optional_positive(body, "ttl")
            context_length = optional_positive(body, "context_length", integer=True)
            instance, seconds = await self.ctx.manager.load(name, ttl_s=ttl_s, context_length=context_length)
        except SimError as exc:
            raise ControlError(exc.status, exc.message) from None
        return {"instance_id": instance.identifier, "load_time_seconds": round(seconds, 3)}

    async def _unload(self, body: dict[str, Any]) -> Any:
        name = _string(body, "model")
        unloaded = self.ctx.manager.unload_named(name)
        if not unloaded:
            raise ControlError(404, f"nothing loaded under {name!r}")
        return {"unloaded": unloaded}

    async def _faults(self, body: dict[str, Any]) -> Any:
        return {"faults": [fault.as_dict() for fault in self.ctx.faults.pending]}

    async def _inject(self, body: dict[str, Any]) -> Any:
        params = dict(body)
        kind, count, model = _string(params, "kind"), params.pop("count", 1), params.pop("model", None)
        params.pop("kind")
        try:
            fault = self.ctx.faults.inject(kind, count, model=model, **params)
        except (TypeError, ValueError) as exc:
            raise ControlError(400, str(exc)) from None
        return {"fault": fault.as_dict()}

    async def _clear_faults(self, body: dict[str, Any]) -> Any:
        self.ctx.faults.clear()
        return {"faults": []}

    async def _settings(self, body: dict[str, Any]) -> Any:
        return self.ctx.settings.as_dict()

    async def _patch_settings(self, body: dict[str, Any]) -> Any:
        try:
            return update_settings(self.ctx.settings, body).as_dict()
        except SimConfigError as exc:
            raise ControlError(400, str(exc)) from None


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(400, f'"{key}" must be a non-empty string')
    return value
