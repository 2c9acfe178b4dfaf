"""Deadlines for LLM requests: first token, silence between chunks, and the whole request.

One fixed timeout does not fit LLM traffic: the first token may take a minute (prompt processing,
a model load) while a healthy stream never pauses for long, and a stream that keeps trickling must
still end some time. So there are three deadlines, all measured from this layer:

* ``first_token_s``: from the request's arrival to the first body byte sent to the client (for an
  event stream, the first token). Retries inside this layer all count against it.
* ``idle_s``: once the body has started, the longest silence between two chunks.
* ``total_s``: the whole request, every retry included.

Each is an anyio cancel-scope deadline around the inner app, moved on by the chunks sent, so a
deadline that passes cancels the inner app: its ``finally`` blocks run and the proxy closes the
upstream response, so LM Studio stops generating. The failure is then reported in the only shape
still possible: a 504 ``timeout`` before the response started, an SSE ``event: error`` frame that
ends a started event stream, or an aborted transfer for any other started body (never a clean end).

The idle deadline fires up to 5% of ``idle_s`` (at most 1 s) late, never early: it is moved in
steps rather than on every chunk, which keeps the per-chunk cost to one clock read. It also covers
a client that stops reading (``send`` blocked by backpressure) for longer than ``idle_s``, as
NGINX's ``send_timeout`` does: such a client holds an upstream slot for nobody.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import anyio

from middleware._deadline import deadline_published, loop_clock
from middleware.body import DEFAULT_LIMIT_BYTES, model_of, replaying_receive
from middleware.errors import GatewayTimeout, error_layer_outside, raise_or_render
from middleware.request_id import request_id
from middleware.response import ResponseState
from middleware.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("lmgate.timeout")

__all__ = ["Deadlines", "TimeoutMiddleware"]


@dataclass(frozen=True)
class Deadlines:
    """The three deadlines, in seconds, that apply to one request."""

    first_token_s: float
    idle_s: float
    total_s: float

    def __post_init__(self) -> None:
        for name in ("first_token_s", "idle_s", "total_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds above 0, got {value!r}")


_FIELDS = frozenset(("first_token_s", "idle_s", "total_s"))
# How late the idle deadline may fire: a share of idle_s, capped (see ``timed_send``).
_SLACK_SHARE = 0.05
_MAX_SLACK_S = 1.0


class TimeoutMiddleware:
    """Enforce first-token, idle and total deadlines on HTTP requests; see the module docstring.

    ``per_model`` overrides any of the three for requests whose JSON body names that ``model``
    (``{"big-70b": {"first_token_s": 120}}``); the body is then read here (up to
    ``body_limit_bytes``) and replayed to the inner app.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        first_token_s: float = 45.0,
        idle_s: float = 30.0,
        total_s: float = 600.0,
        per_model: Mapping[str, Mapping[str, float]] | None = None,
        body_limit_bytes: int = DEFAULT_LIMIT_BYTES,
    ) -> None:
        self.app = app
        self.defaults = Deadlines(first_token_s=first_token_s, idle_s=idle_s, total_s=total_s)
        self.per_model: dict[str, Deadlines] = {}
        for model, overrides in (per_model or {}).items():
            unknown = set(overrides) - _FIELDS
            if unknown:
                raise ValueError(f"per_model[{model!r}]: unknown keys {sorted(unknown)}; expected {sorted(_FIELDS)}")
            self.per_model[model] = replace(self.defaults, **overrides)
        self.body_limit_bytes = body_limit_bytes

    def deadlines_for(self, model: str | None) -> Deadlines:
        """The deadlines for a request naming ``model`` (the defaults when it has no override)."""
        if model is None:
            return self.defaults
        return self.per_model.get(model, self.defaults)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outside = error_layer_outside(scope)
        now = loop_clock()
        started_at = now()
        deadlines = self.defaults
        if self.per_model:
            deadlines = self.deadlines_for(await model_of(scope, receive, limit_bytes=self.body_limit_bytes))
            receive = replaying_receive(scope, receive)
        total_at = started_at + deadlines.total_s
        first_token_at = min(started_at + deadlines.first_token_s, total_at)
        response = ResponseState()

        # Moving a cancel scope's deadline reschedules a timer, too costly to do for every chunk of
        # a stream. So the idle deadline is moved only when it is less than ``idle_s`` away, and
        # then ``slack`` further: silence is detected between idle_s and idle_s + slack after the
        # last chunk (never early), with at most one reschedule per slack per stream.
        slack = min(deadlines.idle_s * _SLACK_SHARE, _MAX_SLACK_S)

        idle_deadline = False  # the scope's deadline is the idle one (the body has started)

        with anyio.CancelScope(deadline=first_token_at) as deadline:

            async def timed_send(message: Message) -> None:
                nonlocal idle_deadline
                response.observe(message)
                await send(message)
                if not response.body_started:
                    return
                idle_at = now() + deadlines.idle_s
                if not idle_deadline:  # the first token: from the first-token deadline to the idle one
                    idle_deadline = True
                    deadline.deadline = min(idle_at + slack, total_at)
                elif idle_at > deadline.deadline and deadline.deadline < total_at:
                    deadline.deadline = min(idle_at + slack, total_at)

            with deadline_published(scope, deadline):
                await self.app(scope, receive, timed_send)

        if not deadline.cancel_called or response.finished:
            return
        which, error = _timeout_error(deadlines, response, total_passed=anyio.current_time() >= total_at)
        logger.warning(
            "%s",
            error.message,
            extra={
                "event": "timeout",
                "deadline": which,
                "request_id": request_id(scope),
                "response_started": response.started,
            },
        )
        await raise_or_render(error, send, response, outside=outside)


def _timeout_error(
    deadlines: Deadlines, response: ResponseState, *, total_passed: bool
) -> tuple[str, GatewayTimeout]:
    """Name the deadline that passed, so a client (and the log) can tell a stall from a long answer."""
    if total_passed:
        message = f"The request did not finish within the total deadline of {deadlines.total_s:g} s."
        return "total", GatewayTimeout(message)
    if not response.body_started:
        message = f"The upstream sent no response within the first-token deadline of {deadlines.first_token_s:g} s."
        return "first_token", GatewayTimeout(message)
    message = f"The upstream stream was silent for longer than the idle deadline of {deadlines.idle_s:g} s."
    return "idle", GatewayTimeout(message)
