"""Shared fixtures: anyio on asyncio, real servers on free 127.0.0.1 ports."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
