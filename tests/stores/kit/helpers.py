"""Small helpers the kit's tests (and store-specific tests) write with."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import google_crc32c

from app.stores.base import Store, UploadInfo

MIB = 1024 * 1024
GIB = 1024 * MIB


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def crc(data: bytes) -> int:
    return google_crc32c.value(data)


async def chunked(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def no_chunks() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover - makes this an async generator


async def new_upload(
    store: Store,
    name: str,
    *,
    total: int | None = None,
    content_type: str = "application/octet-stream",
    metadata: dict[str, str] | None = None,
    owner: str | None = None,
) -> UploadInfo:
    return await store.create(
        name, total=total, content_type=content_type, metadata=metadata or {}, owner=owner
    )


async def append(
    store: Store,
    info: UploadInfo,
    data: bytes,
    *,
    chunk_size: int = 64 * 1024,
    total: int | None = None,
) -> UploadInfo:
    return await store.write(info, chunked(data, chunk_size), total=total)


def durable_fields(info: UploadInfo) -> tuple[object, ...]:
    """What must read back identically from any instance (``version`` is opaque)."""
    return (
        info.name,
        info.session_id,
        info.offset,
        info.total,
        info.part_size,
        info.crc32c,
        info.content_type,
        dict(info.metadata),
        info.owner,
        info.created_at,
        info.updated_at,
        info.completed,
    )
