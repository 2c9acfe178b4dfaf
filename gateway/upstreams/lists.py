"""The model lists of several upstreams, merged into one answer.

``GET /v1/models`` (OpenAI), ``/api/v0/models`` and ``/api/v1/models`` (LM Studio) are asked of
every upstream at once and answered with each model once, at its best state: an ``/api/v0`` entry
that is ``loaded`` somewhere wins over ``not-loaded`` copies, and an ``/api/v1`` entry carries the
loaded instances of every upstream. ``X-Lmgate-Upstream`` names the upstreams in the answer;
``X-Lmgate-Upstreams-Unanswered`` those that could not be asked (the list is then partial, never
refused while one upstream answers). ``/lmgate/models`` shows the same per upstream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio

from gateway.models.upstream import ModelApiError
from gateway.upstreams.upstream import Upstream
from middleware.types import Send

__all__ = ["MODEL_LISTS", "ModelLists", "merge"]

MODEL_LISTS = frozenset({"/v1/models", "/api/v0/models", "/api/v1/models"})


class ModelLists:
    """Answer a model-list request from every upstream at once."""

    def __init__(self, upstreams: Sequence[Upstream], *, timeout_s: float) -> None:
        self.upstreams = list(upstreams)
        self.timeout_s = timeout_s

    async def serve(self, path: str, send: Send, *, head: bool = False) -> bool:
        """Send the merged list; False (nothing sent) when no upstream answered it with 200."""
        answers: dict[str, Any] = {}
        unanswered: list[str] = []

        async def ask(upstream: Upstream) -> None:
            with anyio.move_on_after(self.timeout_s):
                try:
                    status, document = await upstream.models.upstream.get_json(path)
                except ModelApiError:
                    unanswered.append(upstream.name)
                    return
                if status == 200 and isinstance(document, dict):
                    answers[upstream.name] = document
                return
            unanswered.append(upstream.name)

        async with anyio.create_task_group() as tg:
            for upstream in self.upstreams:
                tg.start_soon(ask, upstream)
        if not answers:
            return False
        names = [u.name for u in self.upstreams if u.name in answers]  # config order
        body = json.dumps(merge([answers[name] for name in names]), separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"x-lmgate-upstream", ", ".join(names).encode("ascii")),
        ]
        if unanswered:
            ordered = [u.name for u in self.upstreams if u.name in unanswered]
            headers.append((b"x-lmgate-upstreams-unanswered", ", ".join(ordered).encode("ascii")))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})
        return True


def merge(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """One list from several, in the first document's shape: each model once, at its best state.

    OpenAI and ``/api/v0`` lists keep their entries under ``data`` keyed by ``id``; LM Studio's
    ``/api/v1`` under ``models`` keyed by ``key``. A document in neither shape is left out.
    """
    container = "data" if isinstance(documents[0].get("data"), list) else "models"
    merged: dict[str, dict[str, Any]] = {}
    for document in documents:
        entries = document.get(container)
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            key = entry.get("key", entry.get("id")) if container == "models" else entry.get("id")
            if not isinstance(key, str):
                continue
            known = merged.get(key)
            merged[key] = entry if known is None else _better(known, entry)
    return {**documents[0], container: list(merged.values())}


def _better(known: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The entry to show for a model two upstreams list: the loaded one, or both instances."""
    if known.get("state") != "loaded" and other.get("state") == "loaded":
        return other  # /api/v0: loaded somewhere beats not-loaded here
    mine, theirs = known.get("loaded_instances"), other.get("loaded_instances")
    if isinstance(mine, list) and isinstance(theirs, list) and theirs:
        ids = {instance.get("id") for instance in mine if isinstance(instance, dict)}
        extra = [i for i in theirs if not (isinstance(i, dict) and i.get("id") in ids)]
        return {**known, "loaded_instances": [*mine, *extra]}  # /api/v1: every upstream's instances
    return known
