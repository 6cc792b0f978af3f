"""The configuration's typed sections, their defaults and value types."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

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
    #: Session records and write leases rely on If-Match/If-None-Match; off
    #: only for buckets without them, with one instance or sticky sessions.
    conditional_writes: bool = True


@dataclass(frozen=True)
class StorageConfig:
    backend: Literal["filesystem", "s3", "memory"] = "filesystem"
    part_size: Size = 6 * 1024 * 1024
    #: Largest part an S3 upload may settle on to match its client's chunks
    #: (each write holds up to ``parts_in_flight + 1`` part buffers).
    max_part_size: Size = 64 * 1024 * 1024
    #: Largest object accepted; unset means only the store's own limits apply.
    max_upload_size: Size | None = None
    #: Unfinished uploads idle longer than this answer 404.
    upload_ttl: Duration = 7 * 86400.0
    #: Parts uploaded concurrently per upload while the next one fills.
    parts_in_flight: int = 2
    #: How long a new request waits for the previous writer of the same upload.
    takeover_timeout: Duration = 10.0
    #: How long an instance's write lease on an S3 upload lasts unless renewed
    #: (it is, while data flows); after a crash, others wait at most this long.
    lease_ttl: Duration = 15.0
    #: Bound on persisting what arrived when a client goes away.
    persist_timeout: Duration = 30.0
    #: Compute MD5 of uploads sent in one request, for ``md5Hash`` in the answer.
    #: Costs about 1.3 CPU-seconds per GiB; a client-sent md5 is checked regardless.
    md5: bool = False
    #: Largest body that a per-request checksum (tus ``Upload-Checksum``, the
    #: IETF draft's ``Content-Digest``) may cover: it is held in memory until
    #: verified, so none of a corrupt body ever counts.
    checksum_buffer: Size = 64 * 1024 * 1024
    #: Upload bytes the whole process may hold in memory at once: every part
    #: buffer (``parts_in_flight + 1`` per S3 write) and every body held for
    #: its checksum is taken from it. A request finding it used up waits,
    #: reading nothing more from its client.
    memory_budget: Size = 256 * 1024 * 1024
    #: How long a request waits for memory before it is answered 503 with
    #: ``Retry-After`` (what it delivered before is kept).
    budget_wait: Duration = 30.0
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
