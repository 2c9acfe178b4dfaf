"""The wire formats of LM Studio's inference routes, one dialect class per API."""

from __future__ import annotations

from gateway.simulator.formats.base import DONE, Answer, Dialect, Request, sse
from gateway.simulator.formats.chat import ChatCompletions, ChatCompletionsV0, Completions, CompletionsV0
from gateway.simulator.formats.messages import Messages
from gateway.simulator.formats.responses import Responses

#: route -> dialect class (instantiate per request).
DIALECTS: dict[str, type[Dialect]] = {
    cls.route: cls for cls in (ChatCompletions, ChatCompletionsV0, Completions, CompletionsV0, Responses, Messages)
}

__all__ = ["DIALECTS", "DONE", "Answer", "Dialect", "Request", "sse"]
