"""What the status page remembers about finished requests: recent errors and a short latency series.

The telemetry layer already keeps rolling percentiles per model (``LatencyWindows``); the page
also wants *what went wrong lately* and the points of a small chart, which nothing else keeps.
:class:`RequestBoard` is registered as a ``Telemetry.on_request_end`` observer and holds both in
bounded deques, so a busy gateway costs it a few appends per request and a fixed amount of memory.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from gateway.telemetry.record import NOT_INFERENCE, RequestOutcome, RequestRecord
from middleware.types import Clock

_MESSAGE_CHARS = 300


class RequestBoard:
    """Recent errors (with counts by category over ``window_s``) and the latest request timings."""

    def __init__(
        self,
        *,
        window_s: float = 300.0,
        max_errors: int = 1000,
        shown_errors: int = 20,
        max_points: int = 120,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.window_s = window_s
        self.shown_errors = shown_errors
        self.clock = clock
        self.wall_clock = wall_clock
        self._errors: deque[tuple[float, dict[str, Any]]] = deque(maxlen=max_errors)
        self._points: deque[tuple[float, str | None, float, float | None]] = deque(maxlen=max_points)

    def observe(self, record: RequestRecord, outcome: RequestOutcome) -> None:
        """A ``Telemetry.on_request_end`` observer."""
        now = self.clock()
        if outcome.category is not None:
            message = outcome.message or ""
            self._errors.append((now, {
                "at": round(self.wall_clock(), 3),
                "category": outcome.category,
                "code": outcome.code,
                "status": outcome.status,
                "model": record.model,
                "route": record.route,
                "message": message[:_MESSAGE_CHARS],
            }))
        elif record.operation != NOT_INFERENCE:
            self._points.append((now, record.model, outcome.latency_s, outcome.ttft_s))

    def errors(self) -> dict[str, Any]:
        """Counts by category inside the window, and the latest errors, newest first."""
        horizon = self.clock() - self.window_s
        live = [error for at, error in self._errors if at >= horizon]
        return {
            "window_s": self.window_s,
            "by_category": dict(Counter(error["category"] for error in live).most_common()),
            "recent": live[::-1][: self.shown_errors],
        }

    def series(self) -> list[dict[str, Any]]:
        """The latest successful requests, oldest first: seconds ago, model, latency and TTFT in ms."""
        now = self.clock()
        return [
            {
                "ago_s": round(now - at, 1),
                "model": model,
                "latency_ms": round(latency_s * 1000),
                "ttft_ms": round(ttft_s * 1000) if ttft_s is not None else None,
            }
            for at, model, latency_s, ttft_s in self._points
        ]
