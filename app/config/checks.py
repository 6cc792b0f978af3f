"""Validation of a built configuration: cross-field and format checks with
messages a person can act on."""

from __future__ import annotations

import re

from app.config.model import Config, ConfigError, StorageConfig


def validate(config: Config) -> None:
    s = config.storage
    if not 0 < config.server.port < 65536:
        raise ConfigError(f"server.port: {config.server.port} is not a TCP port (1-65535)")
    if config.server.public_url and not re.match(r"https?://[^/]+", config.server.public_url):
        raise ConfigError("server.public_url: must be an absolute http(s) URL, e.g. https://up.example.com")
    if s.part_size < 5 * 1024 * 1024 or s.part_size > 5 * 1024**3:
        raise ConfigError("storage.part_size: S3 needs parts between 5MiB and 5GiB")
    if s.max_part_size < s.part_size or s.max_part_size > 5 * 1024**3:
        raise ConfigError(
            f"storage.max_part_size: must be between storage.part_size ({s.part_size} bytes) "
            f"and S3's 5GiB, got {s.max_part_size} bytes; it caps the part size an upload "
            "settles on to match its client's chunks, and each write may hold "
            "storage.parts_in_flight + 1 parts of it in memory"
        )
    if s.max_upload_size is not None and s.max_upload_size <= 0:
        raise ConfigError("storage.max_upload_size: must be positive (or unset for no limit)")
    if s.checksum_buffer < 1024 * 1024:
        raise ConfigError("storage.checksum_buffer: must be at least 1MiB")
    if s.parts_in_flight < 1:
        raise ConfigError("storage.parts_in_flight: must be at least 1")
    _validate_budget(s)
    for name in ("upload_ttl", "takeover_timeout", "persist_timeout", "budget_wait"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"storage.{name}: must be positive")
    if s.lease_ttl < 1:
        raise ConfigError(
            "storage.lease_ttl: must be at least 1s (a part upload must fit in a third of it)"
        )
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


def _validate_budget(s: StorageConfig) -> None:
    part, budget = _size(s.part_size), _size(s.memory_budget)
    if s.memory_budget < s.part_size:
        raise ConfigError(
            f"storage.memory_budget: {budget} is less than one part (storage.part_size "
            f"{part}), so no upload could ever fill a part; raise it to at least {part} "
            f"(each S3 upload uses up to parts_in_flight + 1 = {s.parts_in_flight + 1} parts)"
        )
    if s.checksum_buffer + s.part_size > s.memory_budget:
        raise ConfigError(
            f"storage.checksum_buffer: {_size(s.checksum_buffer)} plus one part ({part}) "
            f"must fit in storage.memory_budget ({budget}): a body held for its checksum is "
            "taken from the budget and then written through part buffers; lower "
            "checksum_buffer or raise memory_budget"
        )


def _size(value: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value} bytes"


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
