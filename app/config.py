"""Typed, frozen configuration: ``config/app.yaml``, then environment overrides.

Every key can be overridden as ``APP__SECTION__KEY`` (nested sections joined
with ``__``), e.g. ``APP__STORAGE__S3__ENDPOINT_URL``. Environment values are
read as YAML scalars; list keys also accept a comma-separated string. ``PORT``
sets ``server.port`` (platforms that run a ``Procfile`` set it).

Invalid configuration raises ``ConfigError`` with one line naming the key and
the problem, so start-up can stop with a message a person can act on.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml

DEFAULT_CONFIG_PATH = Path("config/app.yaml")
ENV_PREFIX = "APP__"


class ConfigError(Exception):
    """Configuration that cannot be used; the message names the key."""


class _Size:
    """Marker: bytes as an integer or a string like ``6MiB`` / ``5GB``."""


class _Duration:
    """Marker: seconds as a number or a string like ``10s`` / ``5m`` / ``24h`` / ``7d``."""


Size = Annotated[int, _Size]
Duration = Annotated[float, _Duration]

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 6291456 or '6MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; use bytes or a unit like '6MiB', '5GB'")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10, '10s', '5m', '24h' or '7d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _DURATION_UNITS:
        raise ValueError(f"{value!r} is not a duration; use seconds or '10s', '5m', '24h', '7d'")
    return float(match.group(1)) * _DURATION_UNITS[unit]


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    #: Absolute base URL clients reach the service at, for ``Location`` headers.
    #: Unset: derived from each request's scheme and Host.
    public_url: str | None = None
    #: How long running requests get to persist what they hold on SIGTERM.
    shutdown_timeout: Duration = 25.0
    #: A client that sends no body byte for this long is treated as gone.
    read_timeout: Duration = 60.0
    #: How long ``/readyz`` reuses its last storage check.
    readiness_cache_ttl: Duration = 2.0
    #: Serve the demo upload pages at ``/`` and ``/demo/`` (development).
    demo_page: bool = False


@dataclass(frozen=True)
class FilesystemConfig:
    root: str = "./data"
    #: fsync data and session state before acknowledging; only turn off for tests.
    fsync: bool = True


@dataclass(frozen=True)
class S3Config:
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    create_bucket: bool = False
    checksum_mode: Literal["when_supported", "when_required"] = "when_supported"
    payload_signing: bool = False
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 60.0
    max_attempts: int = 3


@dataclass(frozen=True)
class StorageConfig:
    backend: Literal["filesystem", "s3", "memory"] = "filesystem"
    part_size: Size = 6 * 1024 * 1024
    #: Largest object accepted; unset means only the store's own limits apply.
    max_upload_size: Size | None = None
    #: Unfinished uploads idle longer than this answer 404.
    upload_ttl: Duration = 7 * 86400.0
    #: Parts uploaded concurrently per upload while the next one fills.
    parts_in_flight: int = 2
    #: How long a new request waits for the previous writer of the same upload.
    takeover_timeout: Duration = 10.0
    #: Bound on persisting what arrived when a client goes away.
    persist_timeout: Duration = 30.0
    #: Compute MD5 of uploads sent in one request, for ``md5Hash`` in the answer.
    #: Costs about 1.3 CPU-seconds per GiB; a client-sent md5 is checked regardless.
    md5: bool = False
    #: Largest body that a per-request checksum (tus ``Upload-Checksum``, the
    #: IETF draft's ``Content-Digest``) may cover: it is held in memory until
    #: verified, so none of a corrupt body ever counts.
    checksum_buffer: Size = 64 * 1024 * 1024
    filesystem: FilesystemConfig = field(default_factory=FilesystemConfig)
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class AuthConfig:
    webhook_url: str | None = None
    timeout: Duration = 5.0
    forward_headers: tuple[str, ...] = ("Authorization", "Cookie")
    cache_ttl: Duration = 0.0
    #: Connections to the webhook at once; a pool of its own, so a slow
    #: callback receiver can never hold up authorization.
    max_connections: int = 256
    #: Bound on waiting for a pooled connection and connecting; ``timeout``
    #: then bounds the webhook's answer alone.
    connect_timeout: Duration = 10.0


@dataclass(frozen=True)
class CallbacksConfig:
    on_complete_url: str | None = None
    secret: str | None = None
    max_attempts: int = 5
    timeout: Duration = 10.0
    #: First retry delay; doubles each attempt, with jitter.
    backoff: Duration = 1.0
    #: Connections to the callback receiver at once (a pool of its own).
    max_connections: int = 32


@dataclass(frozen=True)
class GcsConfig:
    """Google's JSON API upload paths (``/upload/storage/v1/b/{bucket}/o``)."""

    #: Bucket names clients use -> key prefix in the store ("" for the top).
    #: A bucket not listed answers 404: nothing is guessed.
    buckets: Mapping[str, str] = field(default_factory=dict)
    #: Follow an MD5 through chunked sessions so their object resource has
    #: ``md5Hash`` (Google's clients check it when asked; ~1.5 CPU-s/GiB).
    #: Followed within one process: a session continued by another process
    #: or after a restart completes without ``md5Hash``.
    md5: bool = True


@dataclass(frozen=True)
class TusConfig:
    """tus 1.0 and the IETF resumable-upload draft, which share these routes."""

    #: Where uploads are created (``POST``) and addressed (``<path><id>``).
    path: str = "/files/"
    #: Key prefix of objects named by ``Upload-Metadata`` or ``Content-Disposition``.
    prefix: str = "tus/"


@dataclass(frozen=True)
class CorsConfig:
    #: Origins (``https://app.example.com``) or patterns (``https://*.example.com``)
    #: allowed to call the service from a browser; empty: none.
    allowed_origins: tuple[str, ...] = ()
    #: Let pages send cookies / HTTP auth (never together with ``*``).
    allow_credentials: bool = False
    #: How long a browser may cache a preflight answer.
    max_age: Duration = 600.0


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    gcs: GcsConfig = field(default_factory=GcsConfig)
    tus: TusConfig = field(default_factory=TusConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read YAML (``path`` or ``config/app.yaml``), apply ``environ`` overrides, validate."""
    environ = os.environ if environ is None else environ
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    if config_path.exists():
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
        raw = loaded or {}
    elif path is not None:
        raise ConfigError(f"config file {config_path} does not exist")
    _apply_environment(raw, environ)
    config = _build(Config, raw, "")
    _validate(config)
    return config


def config_from_mapping(raw: Mapping[str, Any]) -> Config:
    """Build a validated config from a plain mapping (tests, embedding)."""
    config = _build(Config, dict(raw), "")
    _validate(config)
    return config


def replace(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of ``config`` with some keys changed: ``replace(c, storage={"part_size": 5})``."""
    raw = _to_raw(config)
    for name, values in sections.items():
        _merge(raw.setdefault(name, {}), values)
    return config_from_mapping(raw)


def _to_raw(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_raw(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _merge(target: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    port = environ.get("PORT")
    if port:
        raw.setdefault("server", {})
        if not isinstance(raw["server"], dict):
            raise ConfigError("server: must be a mapping")
        raw["server"]["port"] = _yaml_scalar(port, "PORT")
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            raise ConfigError(f"{name}: malformed override name (use APP__SECTION__KEY)")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {part} is not a section")
            node = child
        node[parts[-1]] = _yaml_scalar(value, name)


def _yaml_scalar(value: str, name: str) -> Any:
    try:
        return yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping of keys")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key (known here: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{where}.{f.name}" if where else f.name
        values[f.name] = _convert(hints[f.name], raw[f.name], key)
    return cls(**values)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *markers = get_args(tp)
        try:
            if _Size in markers:
                return parse_size(value)
            if _Duration in markers:
                return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        return _convert(base, value, key)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _convert(args[0], value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str | None) for k, v in value.items()
        ):
            raise ConfigError(f"{key}: expected a mapping of strings to strings")
        return {k: "" if v is None else v for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings")
        return tuple(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool | dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _validate(config: Config) -> None:
    s = config.storage
    if not 0 < config.server.port < 65536:
        raise ConfigError(f"server.port: {config.server.port} is not a TCP port (1-65535)")
    if config.server.public_url and not re.match(r"https?://[^/]+", config.server.public_url):
        raise ConfigError("server.public_url: must be an absolute http(s) URL, e.g. https://up.example.com")
    if s.part_size < 5 * 1024 * 1024 or s.part_size > 5 * 1024**3:
        raise ConfigError("storage.part_size: S3 needs parts between 5MiB and 5GiB")
    if s.max_upload_size is not None and s.max_upload_size <= 0:
        raise ConfigError("storage.max_upload_size: must be positive (or unset for no limit)")
    if s.checksum_buffer < 1024 * 1024:
        raise ConfigError("storage.checksum_buffer: must be at least 1MiB")
    if s.parts_in_flight < 1:
        raise ConfigError("storage.parts_in_flight: must be at least 1")
    for name in ("upload_ttl", "takeover_timeout", "persist_timeout"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"storage.{name}: must be positive")
    if s.backend == "s3":
        if not s.s3.bucket:
            raise ConfigError(
                "storage.s3.bucket: required when storage.backend is s3 "
                "(set it in the YAML or as APP__STORAGE__S3__BUCKET)"
            )
        if s.s3.endpoint_url and not re.match(r"https?://", s.s3.endpoint_url):
            raise ConfigError("storage.s3.endpoint_url: must start with http:// or https://")
        if s.s3.prefix.startswith("/"):
            raise ConfigError("storage.s3.prefix: must not start with '/'")
        if s.s3.max_attempts < 1:
            raise ConfigError("storage.s3.max_attempts: must be at least 1")
    for name, url in (("auth.webhook_url", config.auth.webhook_url),
                      ("callbacks.on_complete_url", config.callbacks.on_complete_url)):
        if url and not re.match(r"https?://", url):
            raise ConfigError(f"{name}: must be an http:// or https:// URL")
    if config.callbacks.on_complete_url and not config.callbacks.secret:
        raise ConfigError(
            "callbacks.secret: required with callbacks.on_complete_url so the receiver can "
            "verify the signature (set APP__CALLBACKS__SECRET)"
        )
    if config.callbacks.max_attempts < 1:
        raise ConfigError("callbacks.max_attempts: must be at least 1")
    if config.auth.timeout <= 0 or config.auth.connect_timeout <= 0:
        raise ConfigError("auth.timeout, auth.connect_timeout: must be positive")
    for name, value in (("auth.max_connections", config.auth.max_connections),
                        ("callbacks.max_connections", config.callbacks.max_connections)):
        if value < 1:
            raise ConfigError(f"{name}: must be at least 1")
    _validate_dialects(config)


def _validate_dialects(config: Config) -> None:
    for bucket, prefix in config.gcs.buckets.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]", bucket):
            raise ConfigError(
                f"gcs.buckets: {bucket!r} is not a valid bucket name "
                "(3-222 characters: lowercase letters, digits, '.', '_', '-')"
            )
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ConfigError(f"gcs.buckets.{bucket}: the prefix {prefix!r} must be relative")
    path = config.tus.path
    if not re.fullmatch(r"/([A-Za-z0-9._~-]+/)+", path) or path.startswith(
        ("/upload/", "/static/", "/demo/")
    ) or path in ("/healthz/", "/readyz/", "/metrics/"):
        raise ConfigError(
            f"tus.path: {path!r} must be an absolute path ending in '/', like /files/, "
            "outside /upload/, /static/ and /demo/"
        )
    if config.tus.prefix.startswith("/"):
        raise ConfigError("tus.prefix: must not start with '/'")
    cors = config.cors
    for origin in cors.allowed_origins:
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9*.\-]+(:[0-9]{1,5})?", origin):
            raise ConfigError(
                f"cors.allowed_origins: {origin!r} is not an origin like https://app.example.com "
                "(a '*' may stand for a subdomain: https://*.example.com)"
            )
    if cors.allow_credentials and "*" in cors.allowed_origins:
        raise ConfigError(
            "cors.allow_credentials: cannot be true while cors.allowed_origins contains '*' "
            "(any site could act with your users' cookies); list the origins instead"
        )
    if cors.max_age < 0:
        raise ConfigError("cors.max_age: must not be negative")
