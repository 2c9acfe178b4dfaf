"""Config: validation messages, sources and precedence, and the generated docs staying in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gateway.config.reference import example_yaml, reference_markdown
from gateway.config.settings import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lmgate.yaml"
    path.write_text(text)
    return path


def test_defaults_need_no_file():
    config = load_config(env={})
    assert config == Config()
    assert config.upstream.url == "http://127.0.0.1:1234"
    assert (config.timeouts.first_token_s, config.timeouts.idle_s, config.timeouts.total_s) == (45.0, 30.0, 600.0)


def test_the_users_yaml_shape_loads(tmp_path):
    path = write(
        tmp_path,
        """
listen: {host: 127.0.0.1, port: 8080}
upstream: {url: http://127.0.0.1:1234, api_key_env: LMSTUDIO_API_KEY}
timeouts: {connect_s: 5, first_token_s: 45, idle_s: 30, total_s: 600, per_model: {big-70b: {first_token_s: 120}}}
""",
    )
    config = load_config(path, env={})
    assert config.timeouts.per_model["big-70b"].first_token_s == 120
    with pytest.raises(ValidationError, match="frozen"):
        config.timeouts.first_token_s = 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("timeouts: {first_token_s: abc}", "timeouts.first_token_s: input should be a valid number"),
        ("timeouts: {first_tokn_s: 3}", "timeouts.first_tokn_s: unknown key"),
        ("upstream: {url: 'ftp://x'}", "upstream.url: expected an http:// or https:// URL"),
        ("listen: {port: 70000}", "listen.port: input should be less than or equal to 65535"),
        ("retry: {jitter: fancy}", "retry.jitter: input should be 'full' or 'decorrelated'"),
        ("routes: {extra_prefixes: ['v1/x']}", "routes.extra_prefixes: expected absolute path prefixes"),
        ("routes: {extra_prefixes: ['/v1//x/']}", "routes.extra_prefixes: expected absolute path prefixes"),
        ("auth: {open_paths: ['metrics']}", "auth.open_paths: expected paths as requested"),
        ("auth: {open_paths: ['/lmgate/%2e%2e/metrics']}", "auth.open_paths: expected paths as requested"),
        ("auth: {open_from: lan}", "auth.open_from: input should be 'any' or 'loopback'"),
        ("- just a list", "expected a mapping of sections"),
        ("timeouts: {first_token_s: [", "not valid YAML"),
    ],
)
def test_a_bad_file_names_the_file_the_key_and_what_was_expected(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert str(path) in message
    assert expected in message


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "nope.yaml", env={})


def test_seed_environment_variables_map_to_their_keys():
    config = load_config(
        env={
            "LLM_REQUEST_TIMEOUT_MS": "90000",
            "LLM_MAX_RETRIES": "5",
            "LLM_RETRY_BACKOFF_MS": "250",
            "EVAL_CONCURRENCY": "2",
            "EVAL_PIPELINE_VERSION": "v7",
        }
    )
    assert config.timeouts.first_token_s == 90.0
    assert config.retry.max_retries == 5
    assert config.retry.backoff_base_s == 0.25
    assert config.concurrency.limit == 2
    assert config.logging.pipeline_version == "v7"


def test_precedence_is_file_then_seed_env_then_lmgate_env_then_flags(tmp_path):
    path = write(tmp_path, "timeouts: {first_token_s: 10}\nlisten: {port: 1000}")
    assert load_config(path, env={}).timeouts.first_token_s == 10
    assert load_config(path, env={"LLM_REQUEST_TIMEOUT_MS": "20000"}).timeouts.first_token_s == 20
    env = {"LLM_REQUEST_TIMEOUT_MS": "20000", "LMGATE_TIMEOUTS__FIRST_TOKEN_S": "30"}
    assert load_config(path, env=env).timeouts.first_token_s == 30
    assert load_config(path, env={}, overrides={("listen", "port"): 2000}).listen.port == 2000


def test_environment_values_are_parsed_as_yaml_scalars_and_errors_name_the_variable():
    config = load_config(env={"LMGATE_RETRY__RETRY_STATUSES": "[502, 503]", "LMGATE_RETRY__ENABLED": "false"})
    assert config.retry.retry_statuses == (502, 503)
    assert config.retry.enabled is False
    with pytest.raises(ConfigError, match="environment variable LMGATE_CONCURRENCY__LIMT: concurrency.limt: unknown key"):
        load_config(env={"LMGATE_CONCURRENCY__LIMT": "3"})
    with pytest.raises(ConfigError, match="environment variable LLM_MAX_RETRIES: got 'many'"):
        load_config(env={"LLM_MAX_RETRIES": "many"})


def test_secrets_are_redacted_and_resolved_from_the_environment(tmp_path):
    path = write(tmp_path, "upstream: {api_key: sk-lm-abc:def}")
    config = load_config(path, env={})
    assert "sk-lm-abc" not in str(config.redacted())
    assert config.upstream.resolved_api_key({}) == "sk-lm-abc:def"
    assert Config().upstream.resolved_api_key({"LMSTUDIO_API_KEY": "tok"}) == "tok"
    assert Config().upstream.resolved_api_key({}) is None


def test_the_example_file_lists_every_key_with_its_default_and_is_in_sync():
    committed = (ROOT / "lmgate.example.yaml").read_text()
    assert committed == example_yaml(), "regenerate with: lmgate config example > lmgate.example.yaml"
    assert Config.model_validate(yaml.safe_load(committed)) == Config()


def test_the_configuration_reference_is_in_sync():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), (
        "regenerate with: python -m gateway.config.reference > docs/configuration.md"
    )


@pytest.mark.parametrize(
    ("text", "env", "enabled", "entries"),
    [
        ("", {"EVAL_CACHE_SIZE": "200"}, True, 200),  # an eval pipeline: a size means a cache
        ("cache: {max_entries: 10}", {"EVAL_CACHE_SIZE": "200"}, True, 200),
        ("cache: {enabled: false}", {"EVAL_CACHE_SIZE": "200"}, False, 200),  # said explicitly: stays off
        ("cache: {enabled: true}", {"EVAL_CACHE_SIZE": "0"}, False, 0),  # 0 entries: no cache
        ("", {"EVAL_CACHE_SIZE": "0"}, False, 0),
        ("", {"EVAL_CACHE_SIZE": "200", "LMGATE_CACHE__ENABLED": "false"}, False, 200),  # higher precedence
        ("", {}, False, 500),
    ],
)
def test_eval_cache_size_turns_the_cache_on_as_the_seeds_pipeline_expects(tmp_path, text, env, enabled, entries):
    config = load_config(write(tmp_path, text), env=env)
    assert (config.cache.enabled, config.cache.max_entries) == (enabled, entries)


def test_a_negative_eval_cache_size_names_the_variable():
    expected = "environment variable EVAL_CACHE_SIZE: cache.max_entries: input should be greater"
    with pytest.raises(ConfigError, match=expected):
        load_config(env={"EVAL_CACHE_SIZE": "-1"})


# --- one limit governs: the upstream pool follows the concurrency limit ---------------------------


@pytest.mark.parametrize(
    ("sections", "pool"),
    [
        ({}, 4 + 5),  # limit 4, plus one load, the refresh, the readiness probe, an unload, a health check
        ({"concurrency": {"limit": 500}}, 505),
        ({"concurrency": {"adaptive": True, "limit": 8, "max_limit": 64}}, 64 + 5),
        ({"concurrency": {"limit": 8}, "models": {"max_concurrent_loads": 2, "keep_warm": ["a", "b"]}}, 8 + 8),
        ({"concurrency": {"limit": 8}, "health": {"models": ["a", "b", "c"]}}, 8 + 8),
        ({"concurrency": {"enabled": False}}, None),  # nothing bounds requests: neither may the pool
        ({"concurrency": {"per_model": True}}, None),  # a limit per model has no total
        ({"concurrency": {"limit": 8}, "upstream": {"pool": {"max_connections": 64}}}, 64),
    ],
)
def test_the_upstream_pool_is_derived_from_the_concurrency_limit(sections, pool):
    assert Config.model_validate(sections).upstream_pool_connections() == pool


@pytest.mark.parametrize(
    ("text", "expected", "minimum"),
    [
        (
            "concurrency: {limit: 500}\nupstream: {pool: {max_connections: 100}}",
            "upstream.pool.max_connections (100) is smaller than concurrency.limit (500) plus 5",
            505,
        ),
        (
            "concurrency: {adaptive: true, max_limit: 64}\nupstream: {pool: {max_connections: 20}}",
            "upstream.pool.max_connections (20) is smaller than concurrency.max_limit (64) plus 5",
            69,
        ),
        (
            "concurrency: {per_model: true, limit: 30}\nupstream: {pool: {max_connections: 30}}",
            "upstream.pool.max_connections (30) is smaller than concurrency.limit (30, per model) plus 5",
            35,
        ),
    ],
)
def test_an_explicit_pool_smaller_than_the_concurrency_limit_is_refused(tmp_path, text, expected, minimum):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert str(path) in message and expected in message and f"at least {minimum}" in message


def test_the_pool_check_names_the_environment_variable_that_raised_the_limit(tmp_path):
    path = write(tmp_path, "upstream: {pool: {max_connections: 50}}")
    with pytest.raises(ConfigError, match="environment variable EVAL_CONCURRENCY") as caught:
        load_config(path, env={"EVAL_CONCURRENCY": "64"})
    assert "concurrency.limit (64)" in str(caught.value) and "at least 69" in str(caught.value)
    assert load_config(path, env={"EVAL_CONCURRENCY": "45"}).upstream_pool_connections() == 50
