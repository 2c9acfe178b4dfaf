"""Each upstream's model listing read by one replica at a time and kept on Redis for all.

Per upstream (``scope``), under one hash tag:

* ``copy``: a hash, ``at`` (Redis's clock, ms, when it was written) and ``body`` (the listing as
  JSON: each model's id, type, loaded flag, instances, size and facts; the API that answered; or
  the refresh's error and whether the upstream gave no answer at all). It expires three
  ``refresh_s`` after it was written: a copy older than that is not used by anyone;
* ``lease``: a string, the token of the replica reading the listing now, for ``refresh_s``.

A replica whose registry is due for a refresh takes its turn (one script, one round trip): the
copy if it is younger than the registry's ``refresh_s``; else the lease, unless another replica
holds it. The lease holder asks the upstream and publishes what it heard, which gives the lease
back. A replica that finds the lease taken keeps using the older copy meanwhile; with no copy at
all it waits for the holder's (or takes the lease over once it runs out). So an upstream is asked
for its listing about once per ``refresh_s`` whatever the number of replicas.
"""

from __future__ import annotations

import json
import math
from contextlib import suppress
from itertools import count
from typing import Any

from gateway.models.shared import ListingTurn, SharedListing
from gateway.models.upstream import Api, Listed, ModelFacts
from gateway.state.store import SharedState, StateUnavailable

__all__ = ["RedisListings", "decode", "encode"]

_VERSION = 1
#: A copy is kept (and used while another replica reads a newer one) for this many ``refresh_s``.
KEPT_REFRESHES = 3
_APIS: tuple[Api, ...] = ("api/v1", "api/v0", "v1")

# KEYS: copy, lease. ARGV: fresh_ms, token, lease_ms.
# Returns {0 the copy is fresh | 1 the lease is mine | 2 another replica holds it, body or '', age_ms or -1}.
_TURN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], 'at', 'body')
local age = -1
if f[1] and f[2] then age = math.max(0, now - tonumber(f[1])) end
if age >= 0 and age < tonumber(ARGV[1]) then return {0, f[2], age} end
local body = f[2] or ''
if age < 0 then body = '' end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {1, body, age} end
return {2, body, age}
"""

# KEYS: copy, lease. ARGV: body, keep_ms, token or ''. Writes the copy; gives the lease back if it is this token's.
_PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'at', now, 'body', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""


def encode(listing: SharedListing) -> str:
    models = [
        {
            "id": entry.id,
            "type": entry.type,
            "loaded": entry.loaded,
            "instances": list(entry.instances),
            "size_bytes": entry.size_bytes,
            "facts": None if entry.facts is None else {
                "arch": entry.facts.arch, "quant": entry.facts.quant, "format": entry.facts.format,
                "context_length": entry.facts.context_length,
            },
        }
        for entry in listing.models
    ]  # fmt: skip
    document = {
        "v": _VERSION,
        "api": listing.api,
        "error": listing.error,
        "unreachable": listing.unreachable,
        "took_s": round(listing.took_s, 3),
        "models": models,
    }
    return json.dumps(document, separators=(",", ":"))


def decode(raw: bytes | str, *, age_s: float) -> SharedListing | None:
    """The listing in ``raw``; None if it is not one (another version, or damaged)."""
    try:
        document = json.loads(raw)
        if not isinstance(document, dict) or document.get("v") != _VERSION:
            return None
        api = document["api"]
        error = document["error"]
        models = tuple(_listed(entry) for entry in document["models"])
        if (api is not None and api not in _APIS) or not (error is None or isinstance(error, str)):
            return None
        return SharedListing(
            models=models,
            api=api,
            error=error,
            unreachable=bool(document["unreachable"]),
            took_s=float(document["took_s"]),
            age_s=age_s,
        )
    except (ValueError, KeyError, TypeError):
        return None


def _listed(entry: Any) -> Listed:
    facts = entry["facts"]
    loaded = entry["loaded"]
    size = entry["size_bytes"]
    if not isinstance(entry["id"], str) or not (loaded is None or isinstance(loaded, bool)):
        raise TypeError("not a listed model")
    return Listed(
        id=entry["id"],
        type=_optional(entry["type"], str),
        loaded=loaded,
        instances=tuple(str(instance) for instance in entry["instances"]),
        size_bytes=_optional(size, int),
        facts=None if facts is None else ModelFacts(
            arch=_optional(facts["arch"], str), quant=_optional(facts["quant"], str),
            format=_optional(facts["format"], str), context_length=_optional(facts["context_length"], int),
        ),
    )  # fmt: skip


def _optional(value: Any, kind: type[Any]) -> Any:
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise TypeError(f"expected {kind.__name__} or null")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisListings:
    """:class:`gateway.models.shared.SharedListings` on Redis; see the module docstring."""

    def __init__(self, state: SharedState, *, scope: str = "default", refresh_s: float) -> None:
        self.state = state
        self.scope = scope  # an upstream's name: each upstream's listing is its own
        self.lease_s = refresh_s  # how long a replica may take to read the listing before another may
        self.keep_s = KEPT_REFRESHES * refresh_s  # the oldest copy anyone uses
        self._turn = state.script(_TURN)
        self._publish = state.script(_PUBLISH)
        self._numbers = count()
        self.published = 0  # copies this replica wrote (tests, the status page's curious reader)

    def keys(self) -> list[str]:
        base = "{" + self.state.key("listing", self.scope) + "}"
        return [f"{base}:copy", f"{base}:lease"]

    async def turn(self, *, fresh_s: float) -> ListingTurn | None:
        token = f"{self.state.owner}:{next(self._numbers)}"
        args: list[str | int | float] = [max(1, math.floor(fresh_s * 1000)), token, _ms(self.lease_s)]
        try:
            kind, body, age_ms = await self._turn(self.keys(), args)
        except StateUnavailable:
            return None
        text = _text(body)
        copy = decode(text, age_s=float(age_ms) / 1000) if text else None
        if kind == 0 and copy is None:  # an unreadable copy: read it anew (no lease to give back)
            return ListingTurn(copy=None, mine=True, token=None)
        return ListingTurn(copy=copy, mine=kind == 1, token=token if kind == 1 else None)

    async def publish(self, listing: SharedListing, *, turn: ListingTurn | None) -> None:
        token = turn.token if turn is not None and turn.mine and turn.token is not None else ""
        with suppress(StateUnavailable):  # the others then read the listing themselves
            await self._publish(self.keys(), [encode(listing), _ms(self.keep_s), token])
            self.published += 1


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
