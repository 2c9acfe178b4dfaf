"""``POST /v1/embeddings`` (and ``/api/v0/embeddings``): deterministic unit vectors after a JIT load.

The body follows LM Studio's documented example, including its ``usage`` of zeros. Vectors are
always float arrays: like LM Studio (lmstudio-bug-tracker#756), ``encoding_format`` is ignored,
``"base64"`` included (lmgate's ``middleware/embeddings.py`` encodes them for such clients). An
embedding request uses a slot like a prediction and takes the model's prefill time for its input;
it is not streamed, so a client leaving does not stop it.
"""

from __future__ import annotations

from typing import Any

from gateway.simulator import errors, text
from gateway.simulator.context import SimContext
from gateway.simulator.faults import Fault
from gateway.simulator.formats.chat import ChatCompletions
from gateway.simulator.generation import apply_early_fault, check_model_type
from gateway.simulator.http import Exchange


def _inputs(body: dict[str, Any]) -> list[str]:
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        return raw
    raise errors.bad_request("'input' must be a string or a non-empty array of strings", param="input")


async def serve_embeddings(ctx: SimContext, exchange: Exchange, body: dict[str, Any], fault: Fault | None) -> None:
    dialect = ChatCompletions()  # OpenAI-compatible error bodies
    if await apply_early_fault(fault, exchange, dialect):
        return
    try:
        inputs = _inputs(body)
        name = body.get("model") if isinstance(body.get("model"), str) else None
        ttl = body.get("ttl") if isinstance(body.get("ttl"), int | float) else None
        model, _ = ctx.manager.resolve(name)
        check_model_type(model, embeddings=True)
        arrived = ctx.clock.now()
        instance = await ctx.manager.acquire(name, ttl_s=ttl, signals=exchange.signals, abortable=False)
        assert instance is not None
        start = max(arrived, instance.loaded_at)  # simulated time, as in generation.py
        with ctx.manager.use(instance, exchange.signals, at=start) as usage:
            start = await instance.slots.take(ctx.clock, start, None) or start
            tokens = sum(text.count_tokens(item) for item in inputs)
            done = start + model.ttft_base_s + model.ttft_per_prompt_token_s * tokens
            usage.ended_at = done
            try:
                with exchange.signals.phase(on_disconnect=False):
                    await ctx.clock.sleep_until(done)
                if exchange.signals.unloaded:
                    raise errors.model_unloaded()
            finally:
                instance.slots.release(done)
    except errors.SimError as error:
        await exchange.respond(error.status, dialect.error_body(error), error.headers)
        return
    key = f"{ctx.settings.seed}:{model.id}"  # a text's vector depends only on the seed and the model
    data = [
        {"object": "embedding", "embedding": text.embedding(key, item, model.embedding_dimensions), "index": index}
        for index, item in enumerate(inputs)
    ]
    zeros = {"prompt_tokens": 0, "total_tokens": 0}  # as in LM Studio's documented example
    await exchange.respond(200, {"object": "list", "data": data, "model": model.id, "usage": zeros})
