"""One inference request, phase by phase, with LM Studio's timing and its reaction to a client leaving.

    validate -> [stream: 200 + SSE headers at once] -> JIT load (silent) -> slot queue (silent)
             -> prefill (silent; TTFT = base + per-prompt-token) -> tokens at the model's rate
             -> final frame, usage frame (if asked), [DONE]

Nothing is written between the headers and the first token: no comment, no keep-alive.

When a streaming client leaves (research §3.3):
* during generation: stop at once, count ``generations_cancelled`` and the tokens produced;
* during the prefill: let the prefill finish, then stop (LM Studio's log line says so);
* in the slot queue: leave the queue;
* during a JIT load: keep loading (the model ends up loaded) unless ``abort_load_on_disconnect``.
A non-streaming request is generated to completion whether or not its client is still there.

Timing is discrete-event: ``self.t`` is the request's own simulated time, carried from one phase to
the next (arrival, load finished, slot freed, each token). A phase's deadline is computed from it,
never from whenever the task happened to wake, so a single ``FakeClock.advance(60)`` plays out the
load, the prefill and every token at exactly the simulated times they would have had.

When the serving instance is unloaded (Auto-Evict, ``lms unload``, a fault), the request fails with
"Model unloaded.": an in-band ``event: error`` frame on a stream, a 400 otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from gateway.simulator import errors, text
from gateway.simulator.context import SimContext
from gateway.simulator.errors import SimError
from gateway.simulator.faults import Fault
from gateway.simulator.formats import Answer, Dialect, Request
from gateway.simulator.formats.base import PieceKind
from gateway.simulator.http import EXPRESS_HEADERS, JSON_TYPE, EndWithoutAnswer, Exchange, to_json
from gateway.simulator.models import Instance
from gateway.simulator.spec import SimModel

log = logging.getLogger("gateway.simulator")

QUEUING_LINE = "[LM STUDIO SERVER] Model is currently generating. Queuing request.."
MID_STREAM_FAULTS = frozenset({"crash_mid_stream", "error_mid_stream", "malformed_sse", "model_unloaded_mid_stream"})


async def apply_early_fault(fault: Fault | None, exchange: Exchange, dialect: Dialect) -> bool:
    """Faults that act before the request is looked at. True if the request is over."""
    if fault is None:
        return False
    if fault.kind == "slow_bytes":
        exchange.byte_delay_s = float(fault["delay_s"])
        return False
    if fault.kind == "http_error":
        await exchange.respond(fault["status"], dialect.error_body(_http_error(fault)), _retry_after(fault))
    elif fault.kind == "reset_before_response":
        if not exchange.reset(rst=bool(fault["rst"])):
            raise EndWithoutAnswer
        await exchange.wait_until_client_leaves()
    elif fault.kind == "hang_before_headers":
        await exchange.wait_until_client_leaves()
    else:
        return False
    return True


def _http_error(fault: Fault) -> SimError:
    status, message = int(fault["status"]), str(fault["message"])
    if fault["shape"] == "object":
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return SimError(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})
    return SimError(status, {"error": message})


def _retry_after(fault: Fault) -> tuple[tuple[bytes, bytes], ...]:
    value = fault["retry_after"]
    return () if value is None else ((b"retry-after", str(value).encode()),)


def check_model_type(model: SimModel, *, embeddings: bool) -> None:
    if model.is_embedding != embeddings:
        raise errors.wrong_model_type(model.id, "an embedding model" if embeddings else "an LLM")


class Generation:
    """Runs one chat/completions/responses/messages request after its body was parsed."""

    def __init__(
        self,
        ctx: SimContext,
        exchange: Exchange,
        dialect: Dialect,
        request: Request,
        body: dict[str, Any],
        fault: Fault | None,
    ) -> None:
        self.ctx = ctx
        self.exchange = exchange
        self.signals = exchange.signals
        self.dialect = dialect
        if request.include_usage and not ctx.settings.stream_usage:
            request = replace(request, include_usage=False)  # an engine that ignores the option
        self.request = request
        self.body = body
        self.fault = fault
        self.t = ctx.clock.now()  # the request's simulated time (see the module docstring)

    async def run(self) -> None:
        try:
            await self._run()
        except SimError as error:
            await self.fail(error)

    async def fail(self, error: SimError) -> None:
        if not self.exchange.started:
            await self.exchange.respond(error.status, self.dialect.error_body(error), error.headers)
        elif self.exchange.streaming:
            await self.exchange.write(self.dialect.error_frame(error))
            await self.exchange.finish()  # LM Studio ends the stream after an error event: no [DONE]
        else:
            raise EndWithoutAnswer  # a JSON body was under way (hang fault): nothing valid to add

    def _fault_is(self, kind: str) -> bool:
        return self.fault is not None and self.fault.kind == kind

    async def _run(self) -> None:
        ctx, request = self.ctx, self.request
        model, instance = ctx.manager.resolve(request.model)
        check_model_type(model, embeddings=False)
        self._reject_if_queue_full(instance)
        if request.stream:
            await self.exchange.start_sse()  # LM Studio's Express layer answers at once
        if self._fault_is("hang_after_headers"):
            if not request.stream:
                await self.exchange.start(200, (*EXPRESS_HEADERS, (b"content-type", JSON_TYPE)))
            await self.exchange.wait_until_client_leaves()
            return
        abortable = request.stream and ctx.settings.abort_load_on_disconnect
        instance = await ctx.manager.acquire(
            request.model, ttl_s=request.ttl_s, signals=self.signals, abortable=abortable
        )
        if instance is None or (request.stream and self.signals.has_left):
            return  # the client left while the model loaded: nothing to generate for
        self.t = max(self.t, instance.loaded_at)
        with ctx.manager.use(instance, self.signals, at=self.t) as usage:
            prompt_tokens = text.count_tokens(request.prompt_text)
            if await self._overflowed(instance, prompt_tokens):
                return
            if not await self._take_slot(instance):
                return
            try:
                await self._generate(instance, prompt_tokens)
            finally:
                if self.signals.has_left or self.signals.unloaded:
                    self.t = max(self.t, ctx.clock.now())  # stopped by an outside event, not on schedule
                usage.ended_at = self.t
                instance.slots.release(self.t)

    def _reject_if_queue_full(self, instance: Instance | None) -> None:
        """503 when every slot is busy and the queue is at ``max_queued`` (checked before headers too)."""
        limit = self.ctx.settings.max_queued
        if instance is None or limit is None or instance.slots.busy < instance.slots.size:
            return
        if instance.slots.queued >= limit:
            self.ctx.counters.rejected += 1
            raise errors.server_busy("too many requests are queued")

    async def _overflowed(self, instance: Instance, prompt_tokens: int) -> bool:
        forced = self._fault_is("context_overflow")
        limit = instance.context_length
        if not forced and prompt_tokens <= limit:
            return False
        mode = self.fault["mode"] if forced and self.fault is not None else self.ctx.settings.context_overflow_mode
        if mode == "auto":
            mode = "b" if self.request.stream else "a"
        shown = max(prompt_tokens, limit + 1)
        if mode == "a":
            raise errors.context_overflow_keep(shown, limit)
        if mode == "b":
            raise errors.context_overflow_event(shown, limit)
        answer = self._plan(instance, prompt_tokens, silent=True)  # mode c: a well-formed empty answer
        await self._finish(answer)
        return True

    async def _take_slot(self, instance: Instance) -> bool:
        ctx, slots = self.ctx, instance.slots
        if slots.try_take():
            return True
        self._reject_if_queue_full(instance)
        log.info(QUEUING_LINE)
        timeout = ctx.settings.queue_timeout_s
        deadline = None if timeout is None else self.t + timeout
        granted_at: float | None = None
        ctx.counters.queued += 1
        try:
            with self.signals.phase(on_disconnect=self.request.stream):
                granted_at = await slots.take(ctx.clock, self.t, deadline)
        finally:
            ctx.counters.queued -= 1
        self._raise_if_unloaded(counted=False)
        if self.signals.has_left and self.request.stream:
            return False
        if granted_at is None:
            ctx.counters.rejected += 1
            raise errors.server_busy("the request waited too long for a free slot")
        self.t = granted_at
        return True

    def _raise_if_unloaded(self, *, counted: bool) -> None:
        if self.signals.unloaded:
            if counted:
                self.ctx.counters.generations_killed += 1
            raise errors.model_unloaded()

    def _plan(self, instance: Instance, prompt_tokens: int, *, silent: bool = False) -> Answer:
        """The answer this request gets: deterministic tokens, cut by ``max_tokens``, and its timing."""
        model = instance.model
        settings, request = self.ctx.settings, self.request
        key = text.request_key(settings.seed, self.dialect.route, self.body)
        reasoning = model.reasoning_tokens if self.dialect.reasoning else 0
        content = settings.completion_tokens
        finish: Any = "stop"
        if request.max_tokens is not None and request.max_tokens < reasoning + content:
            finish = "length"
            reasoning = min(reasoning, request.max_tokens)
            content = request.max_tokens - reasoning
        if silent:
            reasoning = content = 0
            finish = "stop"
        answer = Answer(
            id=text.make_id(key, self.dialect.id_prefix),
            created=int(self.ctx.clock.wall()),
            spec=model,
            context_length=instance.context_length,
            prompt_tokens=prompt_tokens,
            reasoning=text.pieces(key, "reasoning", reasoning),
            content=text.pieces(key, "content", content),
            finish_reason=finish,
            ttft_s=model.ttft_base_s + model.ttft_per_prompt_token_s * prompt_tokens,
            generation_s=(reasoning + content) / model.tokens_per_second,
            tokens_per_second=model.tokens_per_second if math.isfinite(model.tokens_per_second) else 0.0,
        )
        if self._fault_is("huge_body") and self.fault is not None:
            answer.reasoning, answer.content = [], ["x" * int(self.fault["size_bytes"])]
        return answer

    async def _generate(self, instance: Instance, prompt_tokens: int) -> None:
        ctx = self.ctx
        ctx.counters.generations_started += 1
        ctx.counters.active_generations += 1
        ctx.counters.max_active_generations = max(ctx.counters.max_active_generations, ctx.counters.active_generations)
        try:
            answer = self._plan(instance, prompt_tokens)
            first_token_at = self.t + answer.ttft_s
            with self.signals.phase(on_disconnect=False):  # a prefill under way finishes first
                await ctx.clock.sleep_until(first_token_at)
            self.t = first_token_at
            self._raise_if_unloaded(counted=True)
            if self.request.stream and self.signals.has_left:
                self._count_cancel(answer)
                return
            if await self._decode(instance, answer, first_token_at):
                await self._finish(answer)
                ctx.counters.generations_completed += 1
        finally:
            ctx.counters.active_generations -= 1

    async def _decode(self, instance: Instance, answer: Answer, first_token_at: float) -> bool:
        """Produce the tokens on schedule; False if the request ended early (cancel or fault)."""
        schedule: list[tuple[PieceKind, str]] = [("reasoning", p) for p in answer.reasoning]
        schedule += [("content", p) for p in answer.content]
        interval = 1.0 / instance.model.tokens_per_second
        stream = self.request.stream
        for index, (kind, piece) in enumerate(schedule):
            if await self._mid_stream_fault(instance, index, len(schedule)):
                return False
            due = first_token_at + index * interval
            with self.signals.phase(on_disconnect=stream):
                await self.ctx.clock.sleep_until(due)
            self._raise_if_unloaded(counted=True)
            if stream and self.signals.has_left:
                self._count_cancel(answer)
                return False
            self.t = due
            if kind == "reasoning":
                answer.emitted_reasoning += 1
            else:
                answer.emitted_content += 1
            if stream:
                frames = self.dialect.open_frames(answer) if index == 0 else []
                frames.append(self.dialect.token_frame(answer, piece, kind))
                for frame in frames:
                    await self.exchange.write(self._maybe_broken(frame, index))
        return not await self._mid_stream_fault(instance, len(schedule), len(schedule))

    async def _mid_stream_fault(self, instance: Instance, index: int, total: int) -> bool:
        """Apply a mid-stream fault due before token ``index``; True if the request is over."""
        fault = self.fault
        if fault is None or fault.kind not in MID_STREAM_FAULTS or index != min(int(fault["after_tokens"]), total):
            return False
        self.fault = None  # fires once
        if fault.kind == "malformed_sse":
            if self.request.stream:
                await self.exchange.write(str(fault["payload"]).encode())
                return False
            self.fault = Fault("invalid_json", 1, fault.model, {})  # a broken body is the non-streaming analogue
            return False
        if fault.kind == "model_unloaded_mid_stream":
            self.ctx.manager.unload(instance, reason="fault")
            return False  # the unload itself ends this generation at its next step
        self.ctx.counters.generations_failed += 1
        if fault.kind == "error_mid_stream":
            raise errors.crashed(str(fault["message"]))
        # crash_mid_stream: streams end mid-body; a whole body is never sent
        if self.request.stream or not self.exchange.reset():
            raise EndWithoutAnswer
        await self.exchange.wait_until_client_leaves()  # the server notices our own hang-up
        return True

    def _maybe_broken(self, frame: bytes, index: int) -> bytes:
        if index == 0 and self._fault_is("invalid_json"):
            return frame[: len(frame) // 2] + b"\n\n"
        return frame

    async def _finish(self, answer: Answer) -> None:
        if self.request.stream:
            frames = self.dialect.open_frames(answer) if answer.completion_tokens == 0 else []
            frames += self.dialect.close_frames(answer, self.request)
            for frame in frames:
                await self.exchange.write(frame)
            await self.exchange.finish()
            return
        data = to_json(self.dialect.body(answer, self.request))
        if self._fault_is("invalid_json"):
            data = data[: len(data) // 2]
        await self.exchange.respond(200, data)

    def _count_cancel(self, answer: Answer) -> None:
        counters = self.ctx.counters
        counters.tokens_before_cancel.append(answer.completion_tokens)
        counters.cancel_times.append(self.signals.left_at or 0.0)
        counters.generations_cancelled += 1
