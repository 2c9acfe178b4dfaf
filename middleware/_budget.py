"""The retry budget shared by every request through one RetryMiddleware."""

from __future__ import annotations

import math

__all__ = ["RetryBudget"]


class RetryBudget:
    """Envoy's retry budget: retries in progress <= max(min_retries, ratio x requests in progress).

    A fixed retry count multiplies the load during an outage (each request tries 1 + max_retries
    times) exactly when the upstream can least take it. A budget caps the extra load at a share
    of the real traffic; the floor keeps retries possible when traffic is low. A retry holds its
    place from the decision to retry (its backoff included) until its attempt ends.
    """

    __slots__ = ("ratio", "min_retries", "active_requests", "active_retries")

    def __init__(self, *, ratio: float, min_retries: int) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self.active_requests = 0
        self.active_retries = 0

    @property
    def limit(self) -> int:
        return max(self.min_retries, math.floor(self.ratio * self.active_requests))

    def try_acquire(self) -> bool:
        if self.active_retries >= self.limit:
            return False
        self.active_retries += 1
        return True

    def release(self) -> None:
        self.active_retries -= 1
