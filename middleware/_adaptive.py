"""The arithmetic behind the concurrency limiter: a moving average and the adaptive limit.

Kept apart from ``middleware.concurrency`` so the control law can be tested with plain numbers
(latency samples in, limit out) without an event loop or a clock.
"""

from __future__ import annotations

__all__ = ["AimdLimit", "Ewma"]


class Ewma:
    """An exponentially weighted moving average; ``value`` is None until the first sample.

    The first sample is taken as is, so a fresh average is not dragged towards zero.
    """

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], not {alpha!r}")
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> float:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        return self.value


class AimdLimit:
    """Additive increase, multiplicative decrease of a concurrency limit, driven by average latency.

    The control law of Netflix concurrency-limits' ``AIMDLimit``, applied to a moving average
    rather than to each sample (as users put it: "if average latency > threshold, temporarily reduce
    concurrency"):

    * average above ``latency_threshold_s``: ``limit = floor(limit * backoff_ratio)`` (at least
      one less), never below ``min_limit``;
    * otherwise, when the limit is actually in use (``in_flight * 2 >= limit``): ``limit + 1``,
      never above ``max_limit``. An idle upstream teaches nothing about capacity, so the limit
      does not creep up on light traffic.

    AIMD rather than a gradient (Envoy, Netflix ``Gradient2``) because a local model server runs
    1 to 16 requests at once: the gradient controllers' ``sqrt(limit)`` headroom term keeps the
    limit near 4 however slow the upstream gets, and their learned baseline drifts towards a
    sustained slowdown and calls it normal. A threshold the operator chose does neither.
    """

    __slots__ = ("min_limit", "max_limit", "latency_threshold_s", "backoff_ratio", "limit", "_latency")

    def __init__(
        self,
        *,
        initial: int,
        min_limit: int,
        max_limit: int,
        latency_threshold_s: float,
        backoff_ratio: float = 0.9,
        smoothing: float = 0.3,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {min_limit} and {max_limit}")
        if latency_threshold_s <= 0:
            raise ValueError(f"latency_threshold_s must be positive, not {latency_threshold_s!r}")
        if not 0.0 < backoff_ratio < 1.0:
            raise ValueError(f"backoff_ratio must be in (0, 1), not {backoff_ratio!r}")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.latency_threshold_s = latency_threshold_s
        self.backoff_ratio = backoff_ratio
        self.limit = min(max(initial, min_limit), max_limit)
        self._latency = Ewma(smoothing)

    @property
    def average_latency_s(self) -> float | None:
        return self._latency.value

    def observe(self, latency_s: float, in_flight: int) -> int:
        """Feed one latency sample, taken while ``in_flight`` requests held a slot; return the limit."""
        if self._latency.add(latency_s) > self.latency_threshold_s:
            self.limit = max(self.min_limit, int(self.limit * self.backoff_ratio))
        elif in_flight * 2 >= self.limit:
            self.limit = min(self.max_limit, self.limit + 1)
        return self.limit
