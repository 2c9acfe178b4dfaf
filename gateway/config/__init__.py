"""Configuration: the frozen, validated settings (``settings``) and their generated reference
(``reference``: ``python -m gateway.config.reference > docs/configuration.md``)."""

from gateway.config.settings import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
