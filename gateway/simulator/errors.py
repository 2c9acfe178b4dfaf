"""LM Studio's errors, with the statuses and bodies it really sends (research §3.1).

LM Studio has two body shapes and uses both: ``{"error": "text"}`` and
``{"error": {"message", "type", "param", "code"}}``. Each constructor below returns the shape that
was captured for that condition; where nothing was captured the choice is marked *assumed* and
documented in docs/simulator.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

AUTH_DOCS = "https://lmstudio.ai/docs/developer/core/authentication"
CRASH_MESSAGE = "The model has crashed without additional information. (Exit code: 11)"


class SimError(Exception):
    """An error LM Studio answers with: ``status`` and the exact JSON ``body``."""

    def __init__(self, status: int, body: dict[str, Any], *, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.status = status
        self.body = body
        self.headers = tuple(headers)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        error = self.body.get("error")
        if isinstance(error, dict):
            return str(error.get("message", ""))
        return str(error)


def _invalid_request(message: str, *, param: str | None = "model", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def unexpected_endpoint(method: str, path: str) -> SimError:
    """Unknown route or method: HTTP **200**, the body is the only sign of trouble."""
    return SimError(200, {"error": f"Unexpected endpoint or method. ({method} {path})"})


def unknown_model(model: str, valid: Iterable[str]) -> SimError:
    examples = ", ".join(valid)
    message = f'Invalid model identifier "{model}". Please specify a valid downloaded model (e.g., {examples}).'
    return SimError(400, _invalid_request(message, code="model_not_found"))


def no_models_loaded() -> SimError:
    message = "No models loaded. Please load a model in the developer page or use the 'lms load' command."
    return SimError(400, _invalid_request(message))


def load_failed(model: str, detail: str) -> SimError:
    return SimError(400, _invalid_request(f'Failed to load model "{model}". Error: {detail}'))


def wrong_model_type(model: str, expected: str) -> SimError:
    """A chat request to an embeddings model or the reverse (assumed wording)."""
    return SimError(400, _invalid_request(f'Model "{model}" is not {expected}.'))


def model_unloaded() -> SimError:
    return SimError(400, {"error": "Model unloaded."})


def crashed(message: str = CRASH_MESSAGE, status: int = 400) -> SimError:
    return SimError(status, {"error": message})


def context_overflow_keep(prompt_tokens: int, context_length: int) -> SimError:
    """Mode (a): the llama.cpp path's 400 with a string body, before any response."""
    message = (
        f"<LM Studio error> Trying to keep the first {prompt_tokens} tokens when context the overflows. "
        f"However, the model is loaded with context length of only {context_length} tokens, which is not "
        "enough. Try to load the model with a larger context length, or provide a shorter input. "
        "Error Data: n/a, Additional Data: n/a"
    )
    return SimError(400, {"error": message})


def context_overflow_event(prompt_tokens: int, context_length: int) -> SimError:
    """Mode (b): 0.4.21's in-band ``event: error`` body (also used if it must answer before headers)."""
    message = (
        f"Input does not fit in context length. The input has {prompt_tokens} tokens, "
        f"but the context length only supports {context_length} tokens."
    )
    return SimError(400, {"error": {"message": message}, "message": message})


def invalid_api_key(provided: bool) -> SimError:
    if provided:
        message = "Malformed LM Studio API token provided. Ensure you are using a valid token."
    else:
        message = (
            "An LM Studio API token is required to make requests to this server, but none was provided "
            "using the Authorization header using the 'Bearer' scheme (i.e., 'Authorization: Bearer "
            f"$LM_API_TOKEN'). Learn more at: {AUTH_DOCS}."
        )
    return SimError(401, {"error": {"type": "invalid_request", "code": "invalid_api_key", "message": message}})


def server_busy(reason: str) -> SimError:
    """503 when the slot queue is full or a request waited too long (body assumed; none captured)."""
    return SimError(503, {"error": f"Server busy: {reason}. Please try again later."})


def bad_request(message: str, *, param: str | None = None) -> SimError:
    """Malformed request bodies (assumed wording; LM Studio's validation text varies by field)."""
    return SimError(400, _invalid_request(message, param=param, code="invalid_request"))


def rest_error(status: int, message: str, *, type_: str, code: str, param: str | None = None) -> SimError:
    """The native REST API's error object (``/api/v1``), as in its ``error`` stream events."""
    return SimError(status, {"error": {"type": type_, "message": message, "code": code, "param": param}})


def missing_parameter(key: str) -> SimError:
    """As ``/api/v1/chat`` reports it: ``"model" is required``."""
    message = f'"{key}" is required'
    return rest_error(400, message, type_="invalid_request", code="missing_required_parameter", param=key)


def invalid_parameter(key: str, expected: str) -> SimError:
    return rest_error(400, f'"{key}" must be {expected}', type_="invalid_request", code="invalid_parameter", param=key)


def no_such_model(name: str, *, status: int = 404) -> SimError:
    """A model key that is not downloaded, on the REST and v0 model routes (assumed wording)."""
    message = f'Model "{name}" not found.'
    return rest_error(status, message, type_="model_not_found", code="model_not_found", param="model")


def no_such_instance(name: str) -> SimError:
    message = f'No loaded model instance found with ID "{name}"'
    return rest_error(404, message, type_="model_not_found", code="model_not_found", param="instance_id")
