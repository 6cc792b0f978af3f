"""Staged data: upload bytes past the last full part, kept in the bucket as
small objects (one per write, keyed by start offset and a token unique to the
write) until a part fills, plus a bounded cache of what this process staged."""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterable
from typing import Any

import google_crc32c

from app.core.digests import crc32c_b64
from app.errors import StorageUnavailable, UploadNotFound
from app.stores.s3.client import S3Client
from app.stores.s3.records import Layout, Record, Segment

log = logging.getLogger("app.stores.s3")


class StagedCache:
    """Staged segments this process wrote, so filling a part rarely GETs them
    back. Bounded, least recently used session evicted first; a miss just reads
    the bucket, which stays the source of truth."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._size = 0
        self._sessions: OrderedDict[str, dict[str, bytes]] = OrderedDict()

    def put(self, session_id: str, leaf: str, data: bytes) -> None:
        if len(data) > self._budget:
            return
        segments = self._sessions.setdefault(session_id, {})
        old = segments.pop(leaf, None)
        if old is not None:
            self._size -= len(old)
        segments[leaf] = data
        self._size += len(data)
        self._sessions.move_to_end(session_id)
        while self._size > self._budget and self._sessions:
            _, evicted = self._sessions.popitem(last=False)
            self._size -= sum(len(d) for d in evicted.values())

    def get(self, session_id: str, leaf: str) -> bytes | None:
        segments = self._sessions.get(session_id)
        if segments is None:
            return None
        self._sessions.move_to_end(session_id)
        return segments.get(leaf)

    def drop(self, session_id: str, leaves: Collection[str] | None = None) -> None:
        segments = self._sessions.get(session_id)
        if segments is None:
            return
        for leaf in list(segments) if leaves is None else leaves:
            data = segments.pop(leaf, None)
            if data is not None:
                self._size -= len(data)
        if not segments:
            del self._sessions[session_id]

    @property
    def size(self) -> int:
        return self._size


class StagedData:
    """Writes, reads and deletes staged segments; the record says which
    segments are valid, so this class never decides that itself."""

    def __init__(self, client: S3Client, layout: Layout, *, checksums: bool,
                 cache_budget: int) -> None:
        self._client = client
        self._layout = layout
        self._checksums = checksums
        self._cache = StagedCache(cache_budget)

    @property
    def cached_bytes(self) -> int:
        return self._cache.size

    @staticmethod
    def new_segment(data: bytes, start: int, *, crc32c: int | None = None) -> Segment:
        """A segment for ``data`` at ``start``, with a fresh token; ``crc32c``:
        the CRC32C of ``data`` when the caller has it already."""
        crc = google_crc32c.value(data) if crc32c is None else crc32c
        return Segment(start, len(data), crc, uuid.uuid4().hex[:16])

    async def put(self, session_id: str, segment: Segment, data: bytes) -> None:
        """Store ``data`` as the staged object of ``segment``."""
        params: dict[str, Any] = {
            "Key": self._layout.staged_key(session_id, segment),
            "Body": data,
        }
        if self._checksums:
            params["ChecksumCRC32C"] = crc32c_b64(segment.crc32c)
        await self._client.call("PutObject", **params)
        self._cache.put(session_id, segment.leaf, data)

    async def fill(self, record: Record, segments: tuple[Segment, ...], buf: bytearray) -> None:
        """Copy staged segments into the head of ``buf`` (the part they start)."""
        if not segments:
            return
        base = segments[0].start // record.part_size * record.part_size
        for segment in segments:
            data = await self.read(record, segment)
            at = segment.start - base
            buf[at : at + segment.length] = data

    async def read_all(self, record: Record, segments: tuple[Segment, ...]) -> list[bytes]:
        """The bytes of ``segments``, in order (the head of the part they start)."""
        return [await self.read(record, segment) for segment in segments]

    async def read(self, record: Record, segment: Segment) -> bytes:
        cached = self._cache.get(record.session_id, segment.leaf)
        if cached is not None:
            return cached
        key = self._layout.staged_key(record.session_id, segment)
        loaded = await self._client.get_bytes(key)
        if loaded is None:
            log.error("staged data %s of %r is missing", key, record.name)
            raise UploadNotFound(
                f"staged data of {record.name!r} is missing (cancelled meanwhile?)"
            )
        data = loaded[0]
        if len(data) != segment.length or google_crc32c.value(data) != segment.crc32c:
            log.error("staged data %s of %r does not match its record", key, record.name)
            raise StorageUnavailable(f"staged data of {record.name!r} failed its CRC32C check")
        return data

    async def delete(self, session_id: str, segments: Iterable[Segment]) -> None:
        """Delete segments no record names any more (failures only logged:
        what is left is garbage the orphan sweep finds)."""
        gone = list(segments)
        if not gone:
            return
        self._cache.drop(session_id, [s.leaf for s in gone])
        await self._client.delete_keys(
            [self._layout.staged_key(session_id, s) for s in gone], quiet=True
        )

    async def discard_session(self, session_id: str, *, quiet: bool) -> None:
        """Delete every staged object of a session that is over."""
        await self._client.delete_prefix(self._layout.staged_prefix(session_id), quiet=quiet)
        self._cache.drop(session_id)

    def forget(self, session_id: str, leaves: Collection[str] | None = None) -> None:
        """Drop cached bytes of segments deleted by someone else than this class."""
        self._cache.drop(session_id, leaves)
