"""The one way lmgate patches hypercorn's classes (serving.py and connections.py use it).

mypy rightly refuses assigning to a method or setting an attribute a function does not declare;
a monkeypatch is beyond what it can check. Doing it here, by ``setattr``, keeps those two
operations in one reviewed place, while each replacement's own signature is still checked where
it is defined. The marker makes every patch idempotent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


def is_patched(method: object, marker: str) -> bool:
    """Whether ``method`` is a replacement installed by :func:`patch_method` with ``marker``."""
    return bool(getattr(method, marker, False))


def patch_method(owner: type, name: str, replacement: Callable[..., Awaitable[Any]], *, marker: str) -> None:
    """Replace ``owner.name`` by ``replacement``, tagged with ``marker`` (see :func:`is_patched`)."""
    setattr(replacement, marker, True)
    setattr(owner, name, replacement)
