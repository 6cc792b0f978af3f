"""Typed, frozen configuration: ``config/app.yaml``, then environment overrides.

Every key can be overridden as ``APP__SECTION__KEY`` (nested sections joined
with ``__``), e.g. ``APP__STORAGE__S3__ENDPOINT_URL``. Environment values are
read as YAML scalars; list keys also accept a comma-separated string. ``PORT``
sets ``server.port`` (platforms that run a ``Procfile`` set it).

Invalid configuration raises ``ConfigError`` with one line naming the key and
the problem, so start-up can stop with a message a person can act on.
"""

from app.config.loading import config_from_mapping, load_config, replace
from app.config.model import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    AuthConfig,
    CallbacksConfig,
    Config,
    ConfigError,
    CorsConfig,
    Duration,
    FilesystemConfig,
    GcsConfig,
    LoggingConfig,
    S3Config,
    ServerConfig,
    Size,
    StorageConfig,
    TusConfig,
    parse_duration,
    parse_size,
)

__all__ = [
    "DEFAULT_CONFIG_PATH", "ENV_PREFIX", "AuthConfig", "CallbacksConfig", "Config", "ConfigError",
    "CorsConfig", "Duration", "FilesystemConfig", "GcsConfig", "LoggingConfig", "S3Config",
    "ServerConfig", "Size", "StorageConfig", "TusConfig", "config_from_mapping", "load_config",
    "parse_duration", "parse_size", "replace",
]
