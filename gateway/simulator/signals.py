"""Why a request's current phase must stop: its client left, or its model was unloaded.

LM Studio treats the two differently by phase, and so does the simulator:

* a client leaving interrupts token generation and a wait in the slot queue at once, a JIT load only
  when ``abort_load_on_disconnect`` is on, and never a prefill under way ("If the model is busy
  processing the prompt, it will finish first") nor a non-streaming request (LM Studio only notices
  on its final write);
* an unload (Auto-Evict, ``lms unload``, TTL never applies to busy models) interrupts every phase.

Each phase runs inside :meth:`Signals.phase`, a cancel scope that the watcher or the model manager
cancels; afterwards the caller looks at ``unloaded`` / ``left`` to know which one happened.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio


class Signals:
    def __init__(self) -> None:
        self.left = anyio.Event()
        self.left_at: float | None = None  # time.monotonic() when the disconnect was noticed
        self.unloaded = False
        self._phases: list[tuple[anyio.CancelScope, bool]] = []

    @property
    def has_left(self) -> bool:
        return self.left.is_set()

    def client_left(self) -> None:
        if self.left.is_set():
            return
        self.left_at = time.monotonic()
        self.left.set()
        for scope, on_disconnect in self._phases:
            if on_disconnect:
                scope.cancel()

    def model_unloaded(self) -> None:
        self.unloaded = True
        for scope, _ in self._phases:
            scope.cancel()

    @contextmanager
    def phase(self, *, on_disconnect: bool) -> Iterator[anyio.CancelScope]:
        """A cancel scope that ends if the model is unloaded, and if ``on_disconnect``, if the client leaves."""
        scope = anyio.CancelScope()
        entry = (scope, on_disconnect)
        if self.unloaded or (on_disconnect and self.has_left):
            scope.cancel()
        self._phases.append(entry)
        try:
            with scope:
                yield scope
        finally:
            self._phases.remove(entry)
