"""The request id: taken from the client's ``X-Request-ID`` when it is sane, else generated."""

from __future__ import annotations

import re
import uuid

from middleware.types import Scope

_STATE_KEY = "lmgate.request_id"
# Printable, header-safe and short: anything else from a client is replaced, not echoed.
_ACCEPTABLE = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id(scope: Scope) -> str:
    """Return this request's id, creating it on first use and caching it in ``scope["state"]``."""
    state = scope.setdefault("state", {})
    cached = state.get(_STATE_KEY)
    if isinstance(cached, str):  # only this function stores it
        return cached
    rid: str
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id" and _ACCEPTABLE.fullmatch(value):
            rid = value.decode("ascii")
            break
    else:
        rid = uuid.uuid4().hex
    state[_STATE_KEY] = rid
    return rid
