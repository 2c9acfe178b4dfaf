"""What a simulated LM Studio holds: its downloaded models (:class:`SimModel`) and its server
settings (:class:`SimSettings`).

Models are frozen: they describe files on disk. Settings are mutable at run time, like LM Studio's
Developer page (``sim.settings.jit = False`` takes effect on the next request). Units are in the
names (``load_delay_s``). YAML files are validated into these by :mod:`gateway.simulator.config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

ModelType = Literal["llm", "vlm", "embeddings"]
OverflowMode = Literal["auto", "a", "b", "c"]

#: LM Studio loads models with a 4096-token context unless told otherwise (capped by the model's
#: maximum); a request whose prompt does not fit overflows (research §3.1).
DEFAULT_LOADED_CONTEXT = 4096


@dataclass(frozen=True)
class SimModel:
    """One downloaded model and how fast the simulated hardware runs it."""

    # Read by pydantic when a YAML file is validated into this class: unknown keys are errors.
    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    id: str
    type: ModelType = "llm"
    max_context_length: int = 32768
    context_length: int | None = None  # loaded context; None: min(4096, max_context_length)
    load_delay_s: float = 5.0
    tokens_per_second: float = 50.0  # float("inf"): every token at once after the prefill
    ttft_base_s: float = 0.05
    ttft_per_prompt_token_s: float = 0.0005
    parallel: int = 4  # "Max Concurrent Predictions" per loaded instance; a FIFO queue beyond
    jit: bool = True  # may be loaded just in time (also needs SimSettings.jit)
    loaded: bool = False  # loaded at start-up, as with `lms load` (no TTL, never auto-evicted)
    reasoning_tokens: int = 0  # chat answers start with this many reasoning_content tokens
    embedding_dimensions: int = 768
    publisher: str = "lmstudio-community"
    arch: str = "llama"
    quantization: str = "Q4_K_M"
    format: Literal["gguf", "mlx"] = "gguf"
    size_bytes: int = 4_683_073_952

    def __post_init__(self) -> None:
        if not self.id or self.id != self.id.strip():
            raise ValueError(f"model id must be a non-empty string without surrounding spaces, got {self.id!r}")
        _positive(self, "max_context_length", "parallel", "embedding_dimensions")
        _not_negative(self, "load_delay_s", "ttft_base_s", "ttft_per_prompt_token_s", "reasoning_tokens")
        if not self.tokens_per_second > 0:
            raise ValueError(f"{self.id}: tokens_per_second must be > 0, got {self.tokens_per_second!r}")
        if self.context_length is not None and not 0 < self.context_length <= self.max_context_length:
            raise ValueError(f"{self.id}: context_length must be between 1 and max_context_length")

    @property
    def loaded_context_length(self) -> int:
        return self.context_length or min(DEFAULT_LOADED_CONTEXT, self.max_context_length)

    @property
    def is_embedding(self) -> bool:
        return self.type == "embeddings"


@dataclass
class SimSettings:
    """Server settings; mutable while the simulator runs."""

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    jit: bool = True  # "Just in Time Model Loading"
    auto_evict: bool = True  # "Only Keep Last JIT Loaded Model"
    default_ttl_s: float = 3600.0  # idle TTL of JIT-loaded models when the request sends no `ttl`
    api_token: str | None = None  # "Require Authentication": the one valid bearer token
    duplicate_instance_race: bool = False  # concurrent first requests each load an instance (key, key:2, ...)
    abort_load_on_disconnect: bool = False  # a JIT load stops when its last streaming client leaves
    seed: int = 0  # content, ids and embeddings derive from (seed, request)
    completion_tokens: int = 24  # natural answer length, before max_tokens cuts it ("length")
    context_overflow_mode: OverflowMode = "auto"  # auto: a (400) non-streaming, b (event: error) streaming
    max_queued: int | None = None  # requests waiting for a slot beyond this get 503; None: unbounded
    queue_timeout_s: float | None = None  # a request queued longer than this gets 503; None: waits forever
    single_model_fallback: bool = False  # JIT off + one model loaded: it answers any model name (#619)
    # Send the usage frame when a stream asks (stream_options.include_usage); false: never, as
    # llama-cpp-python's server and LM Studio before 0.3.18 (non-streaming answers keep their usage).
    stream_usage: bool = True

    def __post_init__(self) -> None:
        _not_negative(self, "default_ttl_s", "completion_tokens")
        if self.max_queued is not None and self.max_queued < 0:
            raise ValueError("max_queued must be >= 0 or None")
        if self.queue_timeout_s is not None and self.queue_timeout_s < 0:
            raise ValueError("queue_timeout_s must be >= 0 or None")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_models() -> list[SimModel]:
    """The embedded set for ``lmgate simulate`` and ``lmgate serve --simulate`` without a config.

    A small fast model already loaded (answers stream within a second), a bigger one that JIT-loads
    in a few seconds, and an embeddings model.
    """
    return [
        SimModel(
            id="qwen2.5-0.5b-instruct",
            max_context_length=32768,
            load_delay_s=0.5,
            tokens_per_second=60.0,
            ttft_base_s=0.05,
            ttft_per_prompt_token_s=0.0002,
            loaded=True,
            publisher="lmstudio-community",
            arch="qwen2",
            size_bytes=397_807_936,
        ),
        SimModel(
            id="meta-llama-3.1-8b-instruct",
            max_context_length=131072,
            load_delay_s=3.0,
            tokens_per_second=25.0,
            ttft_base_s=0.1,
            ttft_per_prompt_token_s=0.0005,
            publisher="lmstudio-community",
            arch="llama",
        ),
        SimModel(
            id="text-embedding-nomic-embed-text-v1.5",
            type="embeddings",
            max_context_length=2048,
            load_delay_s=0.5,
            ttft_base_s=0.01,
            ttft_per_prompt_token_s=0.0001,
            publisher="nomic-ai",
            arch="nomic-bert",
            quantization="Q4_K_M",
            size_bytes=84_106_624,
        ),
    ]


def _positive(obj: object, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(obj, name)!r}")


def _not_negative(obj: object, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(obj, name)!r}")
