"""The event loop of the harness processes (mock, load generator): uvloop when installed.

The harness has to stay far from its own ceiling on one core (1,000 streams at 50 chunks/s each
means 50,000 writes and 50,000 reads a second); uvloop roughly halves its cost per read and write.
The proxies under test never see this choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name(requested: str = "auto") -> str:
    """``uvloop`` or ``asyncio``: what ``requested`` ("auto", "uvloop", "asyncio") resolves to here."""
    if requested == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if requested == "uvloop":
            raise
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], requested: str = "auto") -> T:
    if loop_name(requested) == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
