"""What the upstream says about its models, and the calls that load, warm and unload them.

LM Studio has three listings, newest first (research §1.2-1.5); the first one that answers in its
own shape is used from then on:

* ``GET /api/v1/models`` (0.4+): each model's ``loaded_instances`` (``key``, ``key:2``);
* ``GET /api/v0/models`` (0.3.6+): ``state`` is ``loaded`` or ``not-loaded``;
* ``GET /v1/models``: ids only, any OpenAI-compatible server; whether a model is loaded is unknown.

LM Studio answers an unknown route with HTTP 200 and ``{"error": "Unexpected endpoint..."}``, so an
API counts as present only when the body has the expected shape, never by status alone.

A load is ``POST /api/v1/models/load`` where it exists: it blocks until the model is loaded and
reports ``load_time_seconds``, or LM Studio's own error message. Elsewhere a load is a one-token
generation (``max_tokens: 1``, streamed, closed after the answer), which makes the server load the
model just in time; the same request keeps a loaded model warm.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import anyio
import httpx

from gateway.proxy.sse import FrameParser
from gateway.proxy.upstream_errors import describe

Api = Literal["api/v1", "api/v0", "v1"]
_LISTINGS: dict[Api, str] = {"api/v1": "/api/v1/models", "api/v0": "/api/v0/models", "v1": "/v1/models"}
# Answers lmgate reads whole (listings, load results, a one-token answer) are small; cap them anyway.
_MAX_BODY_BYTES = 4 * 1024 * 1024
_WARM_UP_PROMPT = "Hi"
_EMBEDDING_TYPES = frozenset({"embedding", "embeddings"})
# An upstream that answered none of the listings is asked again only after this long.
_REPROBE_S = 600.0


class ModelApiError(Exception):
    """The upstream's model API could not be used: unreachable, refused, or an unexpected answer."""


class UpstreamUnreachable(ModelApiError):
    """No HTTP answer at all: refused, reset or timed out (readiness reports it)."""


class LoadError(Exception):
    """A load failed; ``message`` is the upstream's own explanation where it gave one."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class NotSupported(ModelApiError):
    """The upstream has no API for this (unloading needs LM Studio's ``/api/v1``)."""


@dataclass(frozen=True)
class ModelFacts:
    """What LM Studio's listings say about a model's file, as ``/api/v0`` answers report it
    (``model_info``). ``context_length`` is the loaded context, None while not loaded."""

    arch: str | None = None
    quant: str | None = None
    format: str | None = None
    context_length: int | None = None

    def model_info(self) -> dict[str, Any]:
        """``model_info`` of an ``/api/v0`` answer: the fields known, in LM Studio's order."""
        fields = {"arch": self.arch, "quant": self.quant, "format": self.format, "context_length": self.context_length}
        return {key: value for key, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Listed:
    """One model as the upstream lists it."""

    id: str
    type: str | None = None
    loaded: bool | None = None  # None: this upstream does not say
    instances: tuple[str, ...] = ()
    size_bytes: int | None = None
    facts: ModelFacts | None = None  # LM Studio's listings only

    @property
    def is_embedding(self) -> bool:
        return self.type in _EMBEDDING_TYPES


class UpstreamModels:
    """LM Studio's model APIs (or the OpenAI subset) through the gateway's shared client."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        api_key: str | None = None,
        request_timeout_s: float = 5.0,
        load_method: Literal["auto", "rest", "generate"] = "auto",
    ) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(request_timeout_s)
        self.load_method = load_method
        self.api: Api | None = None  # the listing that answered; fixed once found
        self._no_listing_until: float | None = None

    # -- state --------------------------------------------------------------------------------

    async def listing(self) -> list[Listed]:
        """Every model the upstream lists; raises ``ModelApiError`` if none of the APIs answers.

        An upstream that answers, but none of the listings in its shape, is not asked again for
        ``_REPROBE_S``: it is not going to grow one, and every probe is a request it must serve.
        """
        unsupported = f"The upstream answers none of {', '.join(_LISTINGS.values())} as expected; model state is unknown."
        if self._no_listing_until is not None and anyio.current_time() < self._no_listing_until:
            raise ModelApiError(unsupported)
        candidates: tuple[Api, ...] = (self.api,) if self.api else tuple(_LISTINGS)
        for api in candidates:
            status, document = await self.get_json(_LISTINGS[api])
            if status == 401:
                raise ModelApiError("The upstream refused lmgate's API key (upstream.api_key_env).")
            models = _parse_listing(api, document) if status == 200 else None
            if models is not None:
                self.api = api
                self._no_listing_until = None
                return models
        if self.api is None:
            self._no_listing_until = anyio.current_time() + _REPROBE_S
            raise ModelApiError(unsupported)
        raise ModelApiError(f"The upstream did not answer {_LISTINGS[self.api]} as expected.")

    async def model_facts(self, model: str) -> ModelFacts | None:
        """``GET /api/v0/models/{model}``: the model's facts, None if the upstream cannot say."""
        try:
            status, document = await self.get_json("/api/v0/models/" + quote(model, safe="/"))
        except ModelApiError:
            return None
        if status != 200 or not isinstance(document, dict) or not isinstance(document.get("id"), str):
            return None
        return _v0_facts(document)

    async def get_json(self, path: str) -> tuple[int, Any]:
        try:
            response = await self.client.get(self.url + path, headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(f"The upstream could not be reached: {describe(exc)}") from exc
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    # -- loads and warm-up ----------------------------------------------------------------------

    @property
    def rest_loads(self) -> bool:
        """Whether loads use LM Studio's blocking ``POST /api/v1/models/load``."""
        if self.load_method == "auto":
            return self.api == "api/v1"
        return self.load_method == "rest"

    async def load(self, model: Listed, *, ttl_s: float | None) -> tuple[str, float | None]:
        """Load ``model``; returns the instance id and LM Studio's ``load_time_seconds`` (if it said).

        No timeout here: the caller bounds the whole load (``models.load_timeout_s``).
        """
        if not self.rest_loads:
            await self.warm_up(model, ttl_s=ttl_s)
            return model.id, None
        body: dict[str, Any] = {"model": model.id}
        if ttl_s is not None:
            body["ttl"] = ttl_s  # an extension LM Studio's docs do not list; the simulator honours it
        status, document = await self._post_json("/api/v1/models/load", body, load=True)
        if status == 200 and isinstance(document, dict) and isinstance(document.get("instance_id"), str):
            seconds = document.get("load_time_seconds")
            return document["instance_id"], float(seconds) if isinstance(seconds, (int, float)) else None
        raise LoadError(_error_message(document, f"LM Studio could not load {model.id!r} (HTTP {status})."))

    async def warm_up(self, model: Listed, *, ttl_s: float | None) -> None:
        """A one-token request: loads the model just in time if needed, and resets its idle timer."""
        if model.is_embedding:
            body: dict[str, Any] = {"model": model.id, "input": _WARM_UP_PROMPT}
            if ttl_s is not None:
                body["ttl"] = ttl_s
            status, document = await self._post_json("/v1/embeddings", body, load=True)
            if status != 200 or (isinstance(document, dict) and "error" in document):
                raise LoadError(_error_message(document, f"Warming {model.id!r} up failed (HTTP {status})."))
            return
        body = {
            "model": model.id,
            "messages": [{"role": "user", "content": _WARM_UP_PROMPT}],
            "max_tokens": 1,
            "stream": True,
        }
        if ttl_s is not None:
            body["ttl"] = ttl_s
        await self._one_token(model.id, body)

    async def _one_token(self, model: str, body: Mapping[str, Any]) -> None:
        """Stream a one-token chat answer to its end; an error status or ``event: error`` fails."""
        request = self.client.build_request(
            "POST", self.url + "/v1/chat/completions", json=body, headers=self.headers, timeout=self._untimed()
        )
        try:
            response = await self.client.send(request, stream=True)
            try:
                raw = await _read_capped(response)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise LoadError(f"The upstream could not be reached: {describe(exc)}") from exc
        if response.status_code != 200:
            raise LoadError(_error_message(_json_or_none(raw), f"Warming {model!r} up failed (HTTP {response.status_code})."))
        parser = FrameParser()
        for frame in [*parser.feed(raw.decode("utf-8", "replace")), *parser.close()]:
            data = _json_or_none(frame.data.encode())
            if frame.event == "error" or (isinstance(data, dict) and "error" in data):
                raise LoadError(_error_message(data, f"Warming {model!r} up failed: the stream reported an error."))

    # -- unload ---------------------------------------------------------------------------------

    async def unload(self, instance_id: str) -> None:
        if self.api != "api/v1":
            raise NotSupported("Unloading needs LM Studio's /api/v1 (LM Studio 0.4 or later).")
        status, document = await self._post_json("/api/v1/models/unload", {"instance_id": instance_id})
        if status != 200 or (isinstance(document, dict) and "error" in document):
            raise ModelApiError(_error_message(document, f"LM Studio could not unload {instance_id!r} (HTTP {status})."))

    async def _post_json(self, path: str, body: Mapping[str, Any], *, load: bool = False) -> tuple[int, Any]:
        """POST ``body``; ``load``: no read deadline (the caller's bounds the load), failures are LoadError."""
        try:
            response = await self.client.post(
                self.url + path, json=body, headers=self.headers, timeout=self._untimed() if load else self.timeout
            )
        except httpx.HTTPError as exc:
            error = LoadError if load else ModelApiError
            raise error(f"The upstream could not be reached: {describe(exc)}") from exc
        return response.status_code, _json_or_none(response.content)

    def _untimed(self) -> httpx.Timeout:
        """Connect quickly, then wait as long as the caller's deadline allows (a load takes minutes)."""
        return httpx.Timeout(connect=self.timeout.connect, read=None, write=self.timeout.write, pool=self.timeout.pool)


def _parse_listing(api: Api, document: Any) -> list[Listed] | None:
    """The models in ``document`` if it has the shape of ``api``'s listing, else None."""
    entries = document.get("models" if api == "api/v1" else "data") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return None
    id_field = "key" if api == "api/v1" else "id"
    out = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get(id_field), str):
            listed = _ENTRY_PARSERS[api](entry)
            if listed is None:
                return None  # an entry of another API's shape: not this listing
            out.append(listed)
    return out


def _v1_entry(entry: dict[str, Any]) -> Listed:
    loaded = [i for i in entry.get("loaded_instances") or () if isinstance(i, dict) and isinstance(i.get("id"), str)]
    instances = tuple(i["id"] for i in loaded)
    size = entry.get("size_bytes")
    quantization = entry.get("quantization")
    config = loaded[0].get("config") if loaded else None
    facts = ModelFacts(
        arch=_text(entry.get("architecture")),
        quant=_text(quantization.get("name")) if isinstance(quantization, dict) else None,
        format=_text(entry.get("format")),
        context_length=_count(config.get("context_length")) if isinstance(config, dict) else None,
    )
    return Listed(entry["key"], entry.get("type"), bool(instances), instances, size if isinstance(size, int) else None, facts)


def _v0_entry(entry: dict[str, Any]) -> Listed | None:
    if entry.get("state") not in ("loaded", "not-loaded"):
        return None
    loaded = entry["state"] == "loaded"
    return Listed(entry["id"], entry.get("type"), loaded, (entry["id"],) if loaded else (), facts=_v0_facts(entry))


def _v0_facts(entry: dict[str, Any]) -> ModelFacts:
    return ModelFacts(
        arch=_text(entry.get("arch")),
        quant=_text(entry.get("quantization")),
        format=_text(entry.get("compatibility_type")),
        context_length=_count(entry.get("loaded_context_length")),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


_ENTRY_PARSERS: dict[Api, Callable[[dict[str, Any]], Listed | None]] = {
    "api/v1": _v1_entry,
    "api/v0": _v0_entry,
    "v1": lambda entry: Listed(entry["id"]),
}


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def _error_message(document: Any, fallback: str) -> str:
    """LM Studio's message from ``{"error": "text"}`` or ``{"error": {"message": ...}}``."""
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) and error else fallback


async def _read_capped(response: httpx.Response) -> bytes:
    parts, size = [], 0
    async for chunk in response.aiter_bytes():
        parts.append(chunk)
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            break
    return b"".join(parts)
