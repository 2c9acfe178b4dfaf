"""The simulator's YAML file (``lmgate simulate --config FILE``), validated at the edge.

    control: false            # mount the /__sim/ control API
    settings:                 # SimSettings; every key optional
      jit: true
      auto_evict: true
    models:                   # SimModel list; omit to get default_models()
      - id: qwen2.5-7b-instruct
        load_delay_s: 5
        loaded: false

The file model is frozen and rejects unknown keys; the dataclasses in :mod:`spec` are validated by
pydantic directly (their field types and ``__post_init__`` checks), so there is one list of fields.
A bad file fails with :class:`SimConfigError` naming the file, the key path, the value and what
was expected.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config.settings import ConfigError
from gateway.simulator.spec import SimModel, SimSettings, default_models


class SimConfigError(ConfigError):
    """The simulator's configuration is invalid; the message says where and why."""


class SimulatorFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    control: bool = False
    settings: SimSettings = Field(default_factory=SimSettings)
    models: list[SimModel] | None = None


def load_file(path: str | Path) -> SimulatorFile:
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SimConfigError(f"{source}: cannot read the file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SimConfigError(f"{source}: not valid YAML: {exc}") from None
    return validate(raw if raw is not None else {}, source=source)


def validate(raw: Any, *, source: str = "config") -> SimulatorFile:
    if not isinstance(raw, dict):
        raise SimConfigError(f"{source}: expected a mapping with keys control, settings, models")
    try:
        config = SimulatorFile.model_validate(raw)
    except ValidationError as exc:
        raise SimConfigError(explain(exc, source)) from None
    ids = [model.id for model in config.models or []]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise SimConfigError(f"{source}: models: duplicate id {', '.join(duplicates)}; each model id must be unique")
    return config


def models_of(config: SimulatorFile) -> list[SimModel]:
    return list(config.models) if config.models is not None else default_models()


def update_settings(settings: SimSettings, changes: Any, *, source: str = "settings") -> SimSettings:
    """Apply a partial update in place after validating the result (the control API's PATCH)."""
    if not isinstance(changes, dict):
        raise SimConfigError(f"{source}: expected a mapping of setting names to values")
    merged = validate({"settings": {**settings.as_dict(), **changes}}, source=source).settings
    for f in fields(SimSettings):
        setattr(settings, f.name, getattr(merged, f.name))
    return settings


def explain(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors():
        where = _path(error["loc"])
        if error["type"] == "unexpected_keyword_argument" or error["type"] == "extra_forbidden":
            parent = error["loc"][:-1]
            accepted = _accepted_keys(parent)
            lines.append(f"{source}: {where}: unknown key; expected one of: {accepted}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {where}: {message} (got {error.get('input')!r})")
    return "\n".join(lines)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _accepted_keys(parent: tuple[int | str, ...]) -> str:
    if not parent:
        return ", ".join(SimulatorFile.model_fields)
    owner = SimSettings if parent[0] == "settings" else SimModel
    return ", ".join(f.name for f in fields(owner))
