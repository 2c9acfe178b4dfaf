"""Usage on every answer: asking the upstream for it, and counting a prompt when it gave none.

When lmgate assembles a non-streaming answer (it needs a stream), or telemetry needs the usage
the client did not ask for, the request goes upstream as a stream with
``stream_options.include_usage`` (:func:`upstream_body`); telemetry's ``UsageTap``
(:mod:`gateway.telemetry.stream`) removes that usage frame again before the client sees it.

An engine that ignores ``stream_options.include_usage`` leaves lmgate's assembled answer without
``usage`` (the assembler counts the completion from the stream itself). For the prompt, lmgate
asks the upstream's tokenizer where it has a route for one:

* llama-cpp-python's server: ``POST /extras/tokenize/count`` ``{"input", "model"}`` -> ``{"count"}``;
* llama.cpp's server: ``POST /tokenize`` ``{"content"}`` -> ``{"tokens": [...]}``.

LM Studio has neither (it tokenizes only through its SDK's websocket; an unknown route is a 200
``{"error": ...}``, so a route counts only when the answer has the expected shape). The route that
answers is remembered; an upstream that has none is asked again only after ``reprobe_s``, and
meanwhile the count is estimated at four characters a token (:func:`estimate_tokens`).

Either way the count covers the text of the messages (or the prompt), not the chat template's own
tokens (role markers, a few per message), so it is a little low.

A caution for llama-cpp-python: its server interrupts a running stream whenever another request
arrives (``interrupt_requests``, on by default), this one included. lmgate asks while the request
still holds its concurrency slot, so with ``concurrency.limit: 1`` in front of such a server the
question never cuts another answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import httpx

from middleware.body import request_json
from middleware.types import Scope

PromptSource = Literal["counted", "estimated"]
#: Characters per token of the estimate (English prose averages about four).
CHARS_PER_TOKEN = 4


def upstream_body(scope: Scope, body: bytes, *, assembled: bool, strips_usage: bool) -> bytes:
    """The request body to send upstream: the client's ``body``, or its request asking for a
    stream with usage when lmgate ``assembled`` the answer or telemetry ``strips_usage`` again
    (it asked for usage the client did not)."""
    if assembled or strips_usage:
        return streaming_request_body(request_json(scope) or {})
    return body


def streaming_request_body(document: dict[str, Any]) -> bytes:
    """The client's request ``document``, asking the upstream for a stream with usage."""
    upstream = dict(document)
    upstream["stream"] = True
    options = dict(upstream.get("stream_options") or {})
    options["include_usage"] = True
    upstream["stream_options"] = options
    try:
        return json.dumps(upstream, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" is valid JSON): pass it on escaped, as it came
        return json.dumps(upstream, separators=(",", ":")).encode()


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text, estimated."""
    return math.ceil(chars / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class _Route:
    path: str
    body: Callable[[str, str | None], dict[str, Any]]
    count: Callable[[Any], int | None]


def _count_field(document: Any) -> int | None:
    value = document.get("count") if isinstance(document, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _tokens_field(document: Any) -> int | None:
    tokens = document.get("tokens") if isinstance(document, dict) else None
    return len(tokens) if isinstance(tokens, list) else None


def _llama_cpp_python_body(text: str, model: str | None) -> dict[str, Any]:
    return {"input": text, "model": model} if model else {"input": text}


ROUTES = (
    _Route("/extras/tokenize/count", _llama_cpp_python_body, _count_field),
    _Route("/tokenize", lambda text, model: {"content": text}, _tokens_field),
)


class PromptTokens:
    """Counts prompts with the upstream's tokenizer route (found once), or estimates them."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        upstream_url: str,
        *,
        timeout_s: float = 2.0,
        reprobe_s: float = 600.0,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.client = client
        self.url = upstream_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s)
        self.reprobe_s = reprobe_s
        self.clock = clock
        self.route: _Route | None = None  # the route that answered; kept once found
        self._none_until: float | None = None

    async def count(
        self, request: Mapping[str, Any], *, model: str | None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, PromptSource]:
        """Tokens of the prompt in the client's ``request`` document, and how they were obtained.

        ``headers`` go with the question (the upstream's ``authorization``). Never raises for the
        upstream's sake: any failure falls back to the estimate.
        """
        # Imported here: gateway.telemetry imports this module (estimate_tokens), so a module-level
        # import would make the two packages' import order matter.
        from gateway.telemetry.record import prompt_text

        text = prompt_text(dict(request))
        if not text:
            return 0, "counted"
        counted = await self._ask(text, model, dict(headers or {}))
        return (counted, "counted") if counted is not None else (estimate_tokens(len(text)), "estimated")

    async def _ask(self, text: str, model: str | None, headers: dict[str, str]) -> int | None:
        if self.route is not None:
            return (await self._post(self.route, text, model, headers))[1]
        if self._none_until is not None and self.clock() < self._none_until:
            return None
        answered = False
        for route in ROUTES:
            reached, counted = await self._post(route, text, model, headers)
            if counted is not None:
                self.route, self._none_until = route, None
                return counted
            answered = answered or reached
        if answered:  # it answers, in no tokenizer's shape: do not ask on every request
            self._none_until = self.clock() + self.reprobe_s
        return None

    async def _post(self, route: _Route, text: str, model: str | None, headers: dict[str, str]) -> tuple[bool, int | None]:
        """(whether the upstream answered at all, the count if the answer had the route's shape)."""
        try:
            response = await self.client.post(
                self.url + route.path, json=route.body(text, model), headers=headers, timeout=self.timeout
            )
        except httpx.HTTPError:
            return False, None  # unreachable or slow just now: estimate this once, ask again next time
        if response.status_code != 200:
            return True, None
        try:
            return True, route.count(json.loads(response.content))
        except (ValueError, UnicodeDecodeError):
            return True, None
