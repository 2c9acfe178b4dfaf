"""Injected faults: the failures a gateway must survive, queued for the next N requests or loads.

``inject(kind, count=1, model=None, **params)`` queues a fault; each inference request (chat,
completions, responses, messages, embeddings) takes at most one request fault, the first queued
one whose ``model`` filter matches; each model load takes at most one load fault the same way.
Unknown kinds or parameters fail at injection time, naming what is accepted.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from gateway.simulator.errors import CRASH_MESSAGE

#: kind -> accepted parameters and their defaults. Documented in docs/simulator.md.
REQUEST_FAULTS: dict[str, dict[str, Any]] = {
    # Before any byte: an HTTP error in LM Studio's shape ("string": {"error": m}; "object": the
    # {"error": {message, type, param, code}} form), with Retry-After if given.
    "http_error": {"status": 500, "message": "Internal server error", "shape": "string", "retry_after": None},
    # Close the TCP connection without answering (rst=True: a reset instead of a FIN).
    "reset_before_response": {"rst": False},
    # Never send headers; wait until the client gives up.
    "hang_before_headers": {},
    # 200 and the headers (SSE for streams), then silence until the client gives up.
    "hang_after_headers": {},
    # After `after_tokens` tokens, drop the connection mid-body: no [DONE], no final chunk.
    "crash_mid_stream": {"after_tokens": 3},
    # After `after_tokens` tokens, an in-band `event: error` frame (streams) or a 400 (non-streaming).
    "error_mid_stream": {"after_tokens": 3, "message": CRASH_MESSAGE},
    # Every body byte in its own write, `delay_s` simulated seconds apart.
    "slow_bytes": {"delay_s": 0.01},
    # After `after_tokens` tokens, one broken SSE frame (`payload`), then the stream carries on.
    "malformed_sse": {"after_tokens": 0, "payload": 'data: {"id":"chatcmpl-broken","choices":[{"delta":\n\n'},
    # A 200 non-streaming body cut in half (streams: the first frame's JSON cut in half).
    "invalid_json": {},
    # A valid answer whose content is `size_bytes` long (one delta when streaming).
    "huge_body": {"size_bytes": 1_000_000},
    # Force a context overflow whatever the prompt length; mode auto|a|b|c as in SimSettings.
    "context_overflow": {"mode": "auto"},
    # After `after_tokens` tokens the serving instance is unloaded (as `lms unload`), failing every
    # request on it with "Model unloaded.".
    "model_unloaded_mid_stream": {"after_tokens": 3},
}
LOAD_FAULTS: dict[str, dict[str, Any]] = {
    # The load fails after its delay: JIT requests get 400 "Failed to load model "X". Error: <message>".
    "load_failure": {"message": "Engine protocol startup was aborted."},
    # The load never completes (until unloaded, aborted or the simulator stops).
    "load_hang": {},
}
FAULT_KINDS = (*REQUEST_FAULTS, *LOAD_FAULTS)
#: The faults that act before a request is looked at; the only ones embeddings requests take.
EARLY_FAULTS = frozenset({"http_error", "reset_before_response", "hang_before_headers", "slow_bytes"})


@dataclass
class Fault:
    kind: str
    count: int
    model: str | None
    params: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.params[name]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.count, "model": self.model, **self.params}


class Faults:
    """The queue of pending faults."""

    def __init__(self) -> None:
        self.pending: list[Fault] = []

    def inject(self, kind: str, count: int = 1, *, model: str | None = None, **params: Any) -> Fault:
        defaults = REQUEST_FAULTS.get(kind, LOAD_FAULTS.get(kind))
        if defaults is None:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of: {', '.join(FAULT_KINDS)}")
        unknown = set(params) - set(defaults)
        if unknown:
            accepted = ", ".join(defaults) or "none"
            raise ValueError(f"fault {kind!r} has no parameter {', '.join(sorted(unknown))}; accepted: {accepted}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        fault = Fault(kind, count, model, {**defaults, **params})
        self.pending.append(fault)
        return fault

    def clear(self) -> None:
        self.pending.clear()

    def take_request_fault(self, model: str | None, kinds: Collection[str] = REQUEST_FAULTS.keys()) -> Fault | None:
        """The fault for the next request for ``model`` (only ``kinds`` it can act on), if any."""
        return self._take(kinds, model)

    def take_load_fault(self, model: str) -> Fault | None:
        return self._take(LOAD_FAULTS.keys(), model)

    def _take(self, kinds: Collection[str], model: str | None) -> Fault | None:
        for fault in self.pending:
            if fault.kind in kinds and (fault.model is None or fault.model == model):
                fault.count -= 1
                if fault.count == 0:
                    self.pending.remove(fault)
                return fault
        return None
