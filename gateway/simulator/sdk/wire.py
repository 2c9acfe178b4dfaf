"""The shapes LM Studio's SDK protocol carries: model descriptors, KV configs and errors.

Field names and literals follow the ``lmstudio`` SDK's schemas (``lmstudio._sdk_models``, generated
from lmstudio-js's ``lms-shared-types``), which the SDK validates strictly: an ``llm`` descriptor
needs ``vision`` and ``trainedForToolUse``, ``format`` is one of the SDK's compatibility types (an
MLX model is ``safetensors`` there), a fragment is an object, not a bare string.

Errors are ``SerializedLMSExtendedError`` objects (``title``, optional ``displayData`` with a
``code`` the SDK maps to its own exception classes, e.g. ``generic.noModelMatchingQuery`` to
``LMStudioModelNotFoundError``).
"""

from __future__ import annotations

from typing import Any

from gateway.simulator.catalog import display_name
from gateway.simulator.errors import SimError
from gateway.simulator.models import Instance
from gateway.simulator.spec import SimModel

#: How many names an error lists as examples ("loadedModelsSample"), as LM Studio trims them.
SAMPLE = 5


class SdkError(Exception):
    """An error answered as ``rpcError`` / ``channelError``: ``error`` is the serialized object."""

    def __init__(self, title: str, *, display: dict[str, Any] | None = None, cause: str | None = None) -> None:
        super().__init__(title)
        self.error: dict[str, Any] = {"title": title}
        if cause is not None:
            self.error["cause"] = cause
        if display is not None:
            self.error["displayData"] = display

    @classmethod
    def from_sim(cls, error: SimError) -> SdkError:
        """The same condition the HTTP routes report (load failed, model unloaded), with its text."""
        return cls(error.message)


def domain(model: SimModel) -> str:
    return "embedding" if model.is_embedding else "llm"


def model_path(model: SimModel) -> str:
    """A file path like those LM Studio lists (``publisher/repo/file``); used as the model's path."""
    if model.format == "mlx":
        return f"{model.publisher}/{model.id}-MLX"
    return f"{model.publisher}/{model.id}-GGUF/{model.id}-{model.quantization}.gguf"


def model_info(model: SimModel) -> dict[str, Any]:
    """A downloaded model (``listDownloadedModels``, the ``resolved``/``startLoading`` packets)."""
    info: dict[str, Any] = {
        "type": domain(model),
        "modelKey": model.id,
        "format": "safetensors" if model.format == "mlx" else model.format,
        "displayName": display_name(model),
        "path": model_path(model),
        "sizeBytes": model.size_bytes,
        "paramsString": None,
        "architecture": model.arch,
        "maxContextLength": model.max_context_length,
    }
    if not model.is_embedding:
        info["vision"] = model.type == "vlm"
        info["trainedForToolUse"] = True
    return info


def instance_info(instance: Instance) -> dict[str, Any]:
    """A loaded instance (``listLoaded``, ``getModelInfo``, ``alreadyLoaded``/``loadSuccess``)."""
    return {
        **model_info(instance.model),
        "identifier": instance.identifier,
        "instanceReference": instance.reference,
        "contextLength": instance.context_length,
        "ttlMs": None if instance.ttl_s is None else int(instance.ttl_s * 1000),
    }


def load_config(instance: Instance) -> dict[str, Any]:
    """The KV config an instance was loaded with (``getLoadConfig``, a prediction's ``loadModelConfig``)."""
    prefix = "embedding" if instance.model.is_embedding else "llm"
    return {"fields": [{"key": f"{prefix}.load.contextLength", "value": instance.context_length}]}


def config_fields(stack: Any) -> dict[str, Any]:
    """A KV config stack flattened to ``key -> value``; the first layer naming a key wins
    (the SDK's ``apiOverride`` layer comes first)."""
    fields: dict[str, Any] = {}
    layers = stack.get("layers") if isinstance(stack, dict) else None
    for layer in layers if isinstance(layers, list) else []:
        config = layer.get("config") if isinstance(layer, dict) else None
        for item in config.get("fields", []) if isinstance(config, dict) else []:
            if isinstance(item, dict) and isinstance(item.get("key"), str):
                fields.setdefault(item["key"], item.get("value"))
    return fields


def max_predicted_tokens(fields: dict[str, Any]) -> int | None:
    """``llm.prediction.maxPredictedTokens`` is a checkbox field: ``{"checked": bool, "value": n}``."""
    value = fields.get("llm.prediction.maxPredictedTokens")
    if isinstance(value, dict) and value.get("checked") and isinstance(value.get("value"), int):
        return max(0, int(value["value"]))
    return None


def history_text(history: Any) -> str:
    """The text of every message of a chat history (``{"messages": [{"role", "content": [parts]}]}``)."""
    parts: list[str] = []
    messages = history.get("messages") if isinstance(history, dict) else None
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
    return "\n".join(parts)


def no_model_matching(query: dict[str, Any], loaded: list[str]) -> SdkError:
    """A prediction, embedding or info request whose specifier matches no loaded instance."""
    return SdkError(
        "No loaded model satisfies all requirements specified in the query.",
        display={
            "code": "generic.noModelMatchingQuery",
            "query": query,
            "loadedModelsSample": loaded[:SAMPLE],
            "totalLoadedModels": len(loaded),
        },
    )


def path_not_found(path: str, available: list[str]) -> SdkError:
    """``getOrLoad`` / ``loadModel`` for a model key that is not downloaded."""
    return SdkError(
        f'Cannot find a model matching the path "{path}".',
        display={
            "code": "generic.pathNotFound",
            "path": path,
            "availablePathsSample": available[:SAMPLE],
            "totalModels": len(available),
        },
    )


def identifier_not_found(identifier: str, loaded: list[str]) -> SdkError:
    """``unloadModel`` for an identifier nothing is loaded under."""
    return SdkError(
        f'Cannot find a model with the identifier "{identifier}".',
        display={
            "code": "generic.identifierNotFound",
            "identifier": identifier,
            "loadedModelsSample": loaded[:SAMPLE],
            "totalLoadedModels": len(loaded),
        },
    )


def domain_mismatch(model: SimModel, expected: str) -> SdkError:
    return SdkError(
        f'Model "{model.id}" is not {"an embedding model" if expected == "embedding" else "an LLM"}.',
        display={
            "code": "generic.domainMismatch",
            "path": model_path(model),
            "actualDomain": domain(model),
            "expectedDomain": expected,
        },
    )


def model_unloaded() -> SdkError:
    return SdkError("Model unloaded.", display={"code": "generic.specificModelUnloaded"})
