"""The YAML file of ``lmgate simulate --config``: validated, frozen, and precise when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.simulator import SimConfigError, SimModel, SimSettings, default_models, load_file
from gateway.simulator.config import models_of, update_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    return path


def test_a_full_file(tmp_path):
    config = load_file(
        write(
            tmp_path,
            """
control: true
settings:
  jit: false
  default_ttl_s: 60
models:
  - id: qwen2.5-7b-instruct
    load_delay_s: 2
    loaded: true
  - id: nomic
    type: embeddings
""",
        )
    )
    assert config.control is True
    assert config.settings == SimSettings(jit=False, default_ttl_s=60)
    assert models_of(config) == [SimModel(id="qwen2.5-7b-instruct", load_delay_s=2, loaded=True), SimModel(id="nomic", type="embeddings")]


def test_an_empty_file_means_the_defaults(tmp_path):
    config = load_file(write(tmp_path, ""))
    assert models_of(config) == default_models() and config.settings == SimSettings()


def test_the_default_models_are_a_fast_loaded_llm_a_jit_llm_and_embeddings():
    fast, jit, embed = default_models()
    assert fast.loaded and fast.load_delay_s <= 1 and fast.tokens_per_second >= 50
    assert not jit.loaded and jit.type == "llm"
    assert embed.type == "embeddings"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  - id: a\n    tokens_per_secnd: 5\n", "models[0].tokens_per_secnd: unknown key; expected one of: id, type,"),
        ("settings:\n  jti: true\n", "settings.jti: unknown key; expected one of: jit, auto_evict,"),
        ("modles: []\n", "modles: unknown key; expected one of: control, settings, models"),
        ("models:\n  - id: a\n    load_delay_s: soon\n", "models[0].load_delay_s: Input should be a valid number"),
        ("models:\n  - id: a\n    type: chat\n", "models[0].type: Input should be 'llm', 'vlm' or 'embeddings'"),
        ("models:\n  - id: a\n    parallel: 0\n", "models[0]: parallel must be > 0, got 0"),
        ("models:\n  - id: a\n  - id: a\n", "models: duplicate id a"),
        ("settings:\n  max_queued: -1\n", "settings: max_queued must be >= 0 or None"),
        ("- just a list\n", "expected a mapping"),
        ("models: [\n", "not valid YAML"),
    ],
)
def test_a_bad_file_names_the_file_the_key_and_what_was_expected(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SimConfigError) as caught:
        load_file(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)


def test_a_missing_file(tmp_path):
    with pytest.raises(SimConfigError, match="cannot read the file"):
        load_file(tmp_path / "nope.yaml")


def test_the_file_model_is_frozen(tmp_path):
    config = load_file(write(tmp_path, "control: true\n"))
    with pytest.raises(ValueError):
        config.control = False  # type: ignore[misc]


def test_update_settings_validates_then_applies_in_place():
    settings = SimSettings()
    assert update_settings(settings, {"auto_evict": False}) is settings and settings.auto_evict is False
    with pytest.raises(SimConfigError):
        update_settings(settings, {"seed": "x"})
    assert settings.seed == 0


def test_models_and_settings_refuse_nonsense_in_python_too():
    with pytest.raises(ValueError):
        SimModel(id="a", tokens_per_second=0)
    with pytest.raises(ValueError):
        SimModel(id=" a")
    with pytest.raises(ValueError):
        SimModel(id="a", context_length=10**9)
    with pytest.raises(ValueError):
        SimSettings(default_ttl_s=-1)
