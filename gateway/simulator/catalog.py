"""The model listings, in each API's own shape (research §1.2, §1.4, §1.5).

* ``GET /v1/models``: ids only. JIT on: every downloaded model; JIT off: the loaded instances.
* ``GET /api/v0/models[/{id}]``: ``state`` is ``loaded`` or ``not-loaded`` (no ``loading``: a model
  under way is ``not-loaded``), ``loaded_context_length`` only when loaded; type ``embeddings``.
* ``GET /api/v1/models``: one entry per model with its ``loaded_instances`` (``key``, ``key:2``)
  and their ``config.parallel``; type ``embedding`` (singular, as v1 spells it).
"""

from __future__ import annotations

import re
from typing import Any

from gateway.simulator.models import Instance, ModelManager
from gateway.simulator.spec import SimModel


def openai_models(manager: ModelManager) -> dict[str, Any]:
    # with JIT loading every model is listed (a request loads it); without it, only loaded instances
    ids = list(manager.models) if manager.settings.jit else [instance.identifier for instance in manager.instances]
    return {"data": [{"id": i, "object": "model", "owned_by": "organization_owner"} for i in ids], "object": "list"}


def v0_model(manager: ModelManager, model: SimModel) -> dict[str, Any]:
    loaded = manager.loaded(model)
    entry: dict[str, Any] = {
        "id": model.id,
        "object": "model",
        "type": model.type,
        "publisher": model.publisher,
        "arch": model.arch,
        "compatibility_type": model.format,
        "quantization": model.quantization,
        "state": "loaded" if loaded else "not-loaded",
        "max_context_length": model.max_context_length,
    }
    if loaded:
        entry["loaded_context_length"] = loaded[0].context_length
    if not model.is_embedding:
        entry["capabilities"] = ["tool_use"]
    return entry


def v0_models(manager: ModelManager) -> dict[str, Any]:
    return {"object": "list", "data": [v0_model(manager, m) for m in manager.models.values()]}


def _instance(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.identifier,
        "config": {
            "context_length": instance.context_length,
            "eval_batch_size": 512,
            "parallel": instance.model.parallel,
            "flash_attention": True,
            "offload_kv_cache_to_gpu": True,
        },
    }


def display_name(model: SimModel) -> str:
    return model.id.split("/")[-1].replace("-", " ").title()


def v1_model(manager: ModelManager, model: SimModel) -> dict[str, Any]:
    digits = re.search(r"\d+", model.quantization)  # Q4_K_M -> 4, Q8_0 -> 8, F16 -> 16
    bits = int(digits.group()) if digits else 4
    entry: dict[str, Any] = {
        "type": "embedding" if model.is_embedding else "llm",
        "publisher": model.publisher,
        "key": model.id,
        "display_name": display_name(model),
        "architecture": model.arch,
        "quantization": {"name": model.quantization, "bits_per_weight": bits},
        "size_bytes": model.size_bytes,
        "params_string": None,
        "loaded_instances": [_instance(i) for i in manager.loaded(model)],
        "max_context_length": model.max_context_length,
        "format": model.format,
    }
    if not model.is_embedding:
        entry["capabilities"] = {"vision": model.type == "vlm", "trained_for_tool_use": True}
        entry["description"] = None
        variant = f"{model.id}@{model.quantization.lower()}"
        entry["variants"] = [variant]
        entry["selected_variant"] = variant
    return entry


def v1_models(manager: ModelManager) -> dict[str, Any]:
    return {"models": [v1_model(manager, m) for m in manager.models.values()]}


def processes(manager: ModelManager) -> list[dict[str, Any]]:
    """Loaded instances as ``lms ps --json`` describes them (for the control API)."""
    now = manager.clock.now()
    return [
        {
            "identifier": i.identifier,
            "modelKey": i.model.id,
            "status": i.status,
            "queued": i.slots.queued,
            "busySlots": i.slots.busy,
            "parallel": i.model.parallel,
            "contextLength": i.context_length,
            "jit": i.jit,
            "ttlMs": None if i.ttl_s is None else int(i.ttl_s * 1000),
            "idleSeconds": now - i.last_used,
            "users": len(i.users),
        }
        for i in manager.instances
    ]
