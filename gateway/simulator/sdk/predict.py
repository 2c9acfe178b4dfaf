"""The ``predict`` channel (``respond``, ``respond_stream``, ``complete``) and ``embedString``.

A prediction runs the HTTP generation's phases on the same clock, slots and counters:

    slot queue (silent) -> prefill (TTFT = base + per-prompt-token) -> one ``fragment`` packet per
    token at the model's rate -> ``success`` with ``stats``, ``modelInfo`` and the configs

A ``cancel`` on the channel, or the socket closing, stops it as a streaming client leaving stops an
HTTP stream: at once while tokens are produced, after the prefill if one is under way; it counts
as ``generations_cancelled`` and (for a cancel) ends with ``success`` and ``stopReason:
"userStopped"``, as LM Studio answers. An unload kills it with ``channelError`` "Model unloaded.".
``maxTokens`` cuts the answer (``maxPredictedTokensReached``). The answer's text is deterministic
in the seed and the creation parameter.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.simulator import text
from gateway.simulator.faults import Fault
from gateway.simulator.models import Instance
from gateway.simulator.sdk.loading import find_instance
from gateway.simulator.sdk.session import Channel, Session
from gateway.simulator.sdk.wire import (
    SdkError,
    config_fields,
    history_text,
    instance_info,
    load_config,
    max_predicted_tokens,
    model_unloaded,
)
from gateway.simulator.signals import Signals

#: The fault kinds a prediction takes (see docs/simulator.md, "The SDK protocol").
PREDICTION_FAULTS = frozenset(
    {
        "http_error",
        "hang_before_headers",
        "hang_after_headers",
        "context_overflow",
        "error_mid_stream",
        "crash_mid_stream",
        "model_unloaded_mid_stream",
    }
)
MID_STREAM = frozenset({"error_mid_stream", "crash_mid_stream", "model_unloaded_mid_stream"})


def take_fault(session: Session, model: str, kinds: frozenset[str]) -> Fault | None:
    fault = session.ctx.faults.take_request_fault(model, kinds)
    if fault is not None:
        session.ctx.counters.faults_applied += 1
    return fault


class Prediction:
    def __init__(self, session: Session, channel: Channel, instance: Instance, parameter: dict[str, Any]) -> None:
        self.session = session
        self.ctx = session.ctx
        self.channel = channel
        self.signals = channel.signals
        self.instance = instance
        self.parameter = parameter
        self.fields = config_fields(parameter.get("predictionConfigStack"))
        self.fault = take_fault(session, instance.model.id, PREDICTION_FAULTS)
        self.t = self.ctx.clock.now()  # the prediction's simulated time, as in generation.py
        self.prompt_tokens = text.count_tokens(history_text(parameter.get("history")))
        self.predicted = 0

    def _fault_is(self, *kinds: str) -> bool:
        return self.fault is not None and self.fault.kind in kinds

    async def run(self) -> None:
        if self.fault is not None and self.fault.kind == "http_error":
            raise SdkError(str(self.fault["message"]))
        if self._fault_is("hang_before_headers", "hang_after_headers"):
            await self.signals.left.wait()  # silent until cancelled or the socket closes
            return
        manager, instance = self.ctx.manager, self.instance
        with manager.use(instance, self.signals, at=self.t) as usage:
            limit = instance.context_length
            if self.prompt_tokens > limit or self._fault_is("context_overflow"):
                shown = max(self.prompt_tokens, limit + 1)
                raise SdkError(
                    f"The number of tokens to keep from the initial prompt is greater than the context length "
                    f"(prompt: {shown} tokens, context length: {limit} tokens)."
                )
            granted: float | None = None
            with self.signals.phase(on_disconnect=True):
                granted = await instance.slots.take(self.ctx.clock, self.t, None)
            if self.signals.unloaded:
                raise model_unloaded()
            if granted is None or self.channel.cancelled:
                return  # cancelled while queued: it never started
            self.t = granted
            try:
                await self._generate()
            finally:
                if self.signals.has_left or self.signals.unloaded:
                    self.t = max(self.t, self.ctx.clock.now())
                usage.ended_at = self.t
                instance.slots.release(self.t)

    def _plan(self) -> tuple[list[tuple[str, str]], str]:
        settings, model = self.ctx.settings, self.instance.model
        key = text.request_key(settings.seed, f"sdk:{self.session.namespace}/predict", self.parameter)
        reasoning, content = model.reasoning_tokens, settings.completion_tokens
        stop = "eosFound"
        cap = max_predicted_tokens(self.fields)
        if cap is not None and cap < reasoning + content:
            stop = "maxPredictedTokensReached"
            reasoning = min(reasoning, cap)
            content = cap - reasoning
        pieces = [("reasoning", p) for p in text.pieces(key, "reasoning", reasoning)]
        return pieces + [("none", p) for p in text.pieces(key, "content", content)], stop

    async def _generate(self) -> None:
        counters, model = self.ctx.counters, self.instance.model
        counters.generations_started += 1
        counters.active_generations += 1
        counters.max_active_generations = max(counters.max_active_generations, counters.active_generations)
        try:
            schedule, stop = self._plan()
            await self.channel.send({"type": "promptProcessingProgress", "progress": 0.0})
            ttft = model.ttft_base_s + model.ttft_per_prompt_token_s * self.prompt_tokens
            first_token_at = self.t + ttft
            with self.signals.phase(on_disconnect=False):  # a prefill under way finishes first
                await self.ctx.clock.sleep_until(first_token_at)
            self.t = first_token_at
            self._raise_if_unloaded()
            if self.channel.cancelled:
                await self._stopped(ttft)
                return
            await self.channel.send({"type": "promptProcessingProgress", "progress": 1.0})
            interval = 1.0 / model.tokens_per_second
            for index, (reasoning_type, piece) in enumerate(schedule):
                if await self._mid_stream_fault(index, len(schedule)):
                    return
                due = first_token_at + index * interval
                with self.signals.phase(on_disconnect=True):
                    await self.ctx.clock.sleep_until(due)
                self._raise_if_unloaded()
                if self.channel.cancelled:
                    await self._stopped(ttft)
                    return
                self.t = due
                self.predicted += 1
                fragment = {"content": piece, "tokensCount": 1, "containsDrafted": False, "reasoningType": reasoning_type}
                await self.channel.send({"type": "fragment", "fragment": fragment})
            if await self._mid_stream_fault(len(schedule), len(schedule)):
                return
            await self.channel.send(self._success(stop, ttft))
            counters.generations_completed += 1
        finally:
            counters.active_generations -= 1

    def _raise_if_unloaded(self) -> None:
        if self.signals.unloaded:
            self.ctx.counters.generations_killed += 1
            raise model_unloaded()

    async def _stopped(self, ttft: float) -> None:
        counters = self.ctx.counters
        counters.tokens_before_cancel.append(self.predicted)
        counters.cancel_times.append(self.signals.left_at or 0.0)
        counters.generations_cancelled += 1
        await self.channel.send(self._success("userStopped", ttft))  # nowhere if the socket closed

    async def _mid_stream_fault(self, index: int, total: int) -> bool:
        fault = self.fault
        if fault is None or fault.kind not in MID_STREAM or index != min(int(fault["after_tokens"]), total):
            return False
        self.fault = None  # fires once
        if fault.kind == "model_unloaded_mid_stream":
            self.ctx.manager.unload(self.instance, reason="fault")
            return False  # the unload itself ends the prediction at its next step
        self.ctx.counters.generations_failed += 1
        if fault.kind == "error_mid_stream":
            raise SdkError(str(fault["message"]))
        await self.session.crash()
        return True

    def _success(self, stop: str, ttft: float) -> dict[str, Any]:
        rate = self.instance.model.tokens_per_second
        stats = {
            "stopReason": stop,
            "tokensPerSecond": rate if math.isfinite(rate) else 0.0,
            "numGpuLayers": -1,
            "timeToFirstTokenSec": round(ttft, 3),
            "promptTokensCount": self.prompt_tokens,
            "predictedTokensCount": self.predicted,
            "totalTokensCount": self.prompt_tokens + self.predicted,
        }
        echoed = [{"key": k, "value": v} for k, v in self.fields.items() if k != "llm.prediction.promptTemplate"]
        return {
            "type": "success",
            "stats": stats,
            "modelInfo": instance_info(self.instance),
            "loadModelConfig": load_config(self.instance),
            "predictionConfig": {"fields": echoed},
        }


async def predict(session: Session, channel: Channel, raw: Any) -> None:
    parameter = raw if isinstance(raw, dict) else {}
    instance = find_instance(session, parameter.get("modelSpecifier"))
    session.ctx.counters.requests += 1
    await Prediction(session, channel, instance, parameter).run()


async def embed_string(session: Session, raw: Any, signals: Signals) -> dict[str, Any]:
    """One vector per call, equal to ``POST /v1/embeddings``'s for the same text and model."""
    parameter = raw if isinstance(raw, dict) else {}
    if not isinstance(text_in := parameter.get("inputString"), str):
        raise SdkError('Invalid parameter: "inputString" must be a string.')
    ctx = session.ctx
    instance = find_instance(session, parameter.get("modelSpecifier"))
    model = instance.model
    ctx.counters.requests += 1
    fault = take_fault(session, model.id, frozenset({"http_error"}))
    if fault is not None:
        raise SdkError(str(fault["message"]))
    start = ctx.clock.now()
    with ctx.manager.use(instance, signals, at=start) as usage:
        start = await instance.slots.take(ctx.clock, start, None) or start
        done = start + model.ttft_base_s + model.ttft_per_prompt_token_s * text.count_tokens(text_in)
        usage.ended_at = done
        try:
            with signals.phase(on_disconnect=False):
                await ctx.clock.sleep_until(done)
            if signals.unloaded:
                raise model_unloaded()
        finally:
            instance.slots.release(done)
    return {"embedding": text.embedding(f"{ctx.settings.seed}:{model.id}", text_in, model.embedding_dimensions)}


async def tokenize(session: Session, raw: Any, signals: Signals) -> dict[str, Any]:
    """The simulator's tokenizer (four characters a token), as token ids 0..n-1."""
    parameter = raw if isinstance(raw, dict) else {}
    find_instance(session, parameter.get("specifier"))
    return {"tokens": list(range(text.count_tokens(str(parameter.get("inputString", "")))))}


async def count_tokens(session: Session, raw: Any, signals: Signals) -> dict[str, Any]:
    parameter = raw if isinstance(raw, dict) else {}
    find_instance(session, parameter.get("specifier"))
    return {"tokenCount": text.count_tokens(str(parameter.get("inputString", "")))}
