"""S3 store session records: the record model (``Record``) and its staged
segments (``Segment``), where everything lives in the bucket (``Layout``), and
``Records``, the conditional reads and writes of records.

The record's ETag is the ``UploadInfo.version``; every record update is a
conditional PUT (``IfMatch``/``IfNoneMatch``), so two processes can never both
advance one upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from app.core.leases import Lease
from app.core.protocol import RESERVED_PREFIX
from app.errors import OffsetMismatch, StorageUnavailable, UploadNotFound
from app.stores.base import CompletedObject, UploadInfo
from app.stores.s3.client import S3Client
from app.stores.s3.errors import CONFLICT_CODES, MISSING_KEY_CODES, S3Refusal

log = logging.getLogger("app.stores.s3")

_RECORD_FORMAT = 1
#: S3 requests one listing pass keeps in flight (record reads, ListParts of
#: orphan candidates): one GET per record is the price of the layout, and done
#: one at a time it dominates a big listing; more would crowd the pool the
#: uploads share.
READ_CONCURRENCY = 16
#: Object metadata key tying a finished object to the session that wrote it, so a
#: retried finish can tell "already completed by me" from "gone".
SESSION_META = "upload-session"
#: Object metadata naming the owner the object was stored by (so it outlives
#: the session record); never taken from user metadata.
OWNER_META = "upload-owner"


# -- the session record ------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One staged object: bytes ``[start, start + length)`` of the upload."""

    start: int
    length: int
    crc32c: int
    #: Unique per write, so two writers at one offset never share a key.
    token: str

    @property
    def leaf(self) -> str:
        return f"{self.start:020d}-{self.token}"


@dataclass(frozen=True)
class Part:
    """A part the record accounts for: what completion asks S3 to assemble."""

    #: UploadPart's ETag, without quotes (MD5 of the bytes on AWS, MinIO, moto).
    etag: str
    #: CRC32C of the part's bytes (0 when the upload sends no part checksums).
    crc32c: int
    #: CRC32C of the upload's bytes up to the part's end, so the record can be
    #: rolled back to just before any part.
    end_crc32c: int


@dataclass(frozen=True)
class Record:
    name: str
    session_id: str
    upload_id: str
    offset: int
    total: int | None
    part_size: int
    crc32c: int
    content_type: str
    metadata: dict[str, str]
    owner: str | None
    created_at: float
    updated_at: float
    #: "CRC32C" when the MPU was created with per-part checksums; kept in the
    #: record so a config change cannot mix modes within one MPU.
    checksum_algorithm: str | None
    #: Staged segments covering ``[offset // P * P, offset)`` in order.
    staged: tuple[Segment, ...] = ()
    #: CRC32C of the staged bytes alone: the start of the next part's checksum.
    tail_crc32c: int = 0
    #: Writes so far that staged a remainder shorter than a granule: a budget
    #: (see ``writer.SMALL_WRITE_BUDGET``) that keeps tiny chunks cheap.
    small_writes: int = 0
    completed: CompletedObject | None = None
    target: str | None = None
    #: Parts 1..offset // part_size as their writer recorded them; None for a
    #: record written before parts were recorded (completion lists those).
    parts: tuple[Part, ...] | None = ()
    notify_pending: bool = False
    #: The write lease (see ``app.core.leases``); None when no instance holds it.
    lease: Lease | None = None
    #: The last lease generation issued for this session: the next take is
    #: one higher, so a released lease still fences its old holder off.
    generation: int = 0

    @property
    def object_name(self) -> str:
        return self.name if self.target is None else self.target

    def to_json(self) -> bytes:
        doc = {
            "format": _RECORD_FORMAT,
            **self.to_info(None).to_json(),
            "upload_id": self.upload_id,
            "checksum_algorithm": self.checksum_algorithm,
            "staged": [[s.start, s.length, s.crc32c, s.token] for s in self.staged],
            "tail_crc32c": self.tail_crc32c,
            "small_writes": self.small_writes,
            "parts": None if self.parts is None
            else [[p.etag, p.crc32c, p.end_crc32c] for p in self.parts],
            "lease": None if self.lease is None else self.lease.to_json(),
            "generation": self.generation,
        }
        # ASCII escapes keep any metadata text encodable.
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> Record:
        doc = json.loads(raw)
        info = UploadInfo.from_json(doc)
        return cls(
            **{name: getattr(info, name) for name in _SESSION_FIELDS},
            upload_id=str(doc["upload_id"]),
            checksum_algorithm=doc.get("checksum_algorithm"),
            staged=tuple(
                Segment(int(a), int(b), int(c), str(t)) for a, b, c, t in doc.get("staged", [])
            ),
            tail_crc32c=int(doc.get("tail_crc32c", 0)),
            small_writes=int(doc.get("small_writes", 0)),
            parts=None if doc.get("parts") is None else tuple(
                Part(str(e), int(c), int(x)) for e, c, x in doc["parts"]
            ),
            lease=Lease.from_json(doc.get("lease")),
            generation=int(doc.get("generation", 0)),
        )

    def same_data(self, other: Record) -> bool:
        """Whether ``other`` differs from this record in its lease alone."""
        def bare(record: Record) -> Record:
            return replace(record, lease=None, generation=0, updated_at=0.0)
        return bare(self) == bare(other)

    def to_info(self, version: str | None) -> UploadInfo:
        return UploadInfo(
            **{name: getattr(self, name) for name in _SESSION_FIELDS},
            version=version,
        )


#: The fields a record shares with ``UploadInfo``.
_SESSION_FIELDS = (
    "name", "session_id", "offset", "total", "part_size", "crc32c", "content_type",
    "metadata", "owner", "created_at", "updated_at", "completed", "target",
    "notify_pending",
)


def parse_listed(key: str, raw: bytes) -> Record | None:
    """A listed session record; None (logged) when it is damaged."""
    try:
        return Record.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("skipping damaged session record %s: %r", key, exc)
        return None


# -- where things live ---------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Keys under the configured ``prefix`` (see ``app.stores.s3``)."""

    prefix: str

    @property
    def reserved(self) -> str:
        return f"{self.prefix}{RESERVED_PREFIX}/"

    @property
    def sessions_root(self) -> str:
        return f"{self.reserved}sessions/"

    @property
    def staged_root(self) -> str:
        return f"{self.reserved}staged/"

    @property
    def callbacks_root(self) -> str:
        return f"{self.reserved}callbacks/"

    def object_key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def name_of(self, object_key: str) -> str | None:
        """The upload name of an object key; None outside the prefix."""
        return object_key[len(self.prefix):] if object_key.startswith(self.prefix) else None

    def record_key(self, name: str) -> str:
        # Hashed: names may be 1024 bytes, the whole key may not exceed that.
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.sessions_root}{digest}.json"

    def is_record_key(self, key: str) -> bool:
        return key.startswith(self.sessions_root) and key.endswith(".json")

    def staged_prefix(self, session_id: str) -> str:
        return f"{self.staged_root}{session_id}/"

    def staged_key(self, session_id: str, segment: Segment) -> str:
        return f"{self.staged_prefix(session_id)}{segment.leaf}"

    def split_staged(self, key: str) -> tuple[str, str] | None:
        """(session id, leaf) of a staged object's key; None if it is not one."""
        if not key.startswith(self.staged_root):
            return None
        session_id, _, leaf = key[len(self.staged_root):].partition("/")
        return (session_id, leaf) if session_id and leaf else None

    def callback_key(self, callback_id: str) -> str:
        return f"{self.callbacks_root}{callback_id}"


# -- reading and writing records ---------------------------------------------------


#: Records this process read or wrote last, kept so that a write right after
#: a read of the same version needs no second GET.
_KNOWN_RECORDS = 1024


class Records:
    """Session records in the bucket, read and written conditionally."""

    def __init__(self, client: S3Client, layout: Layout, *, conditional: bool = True) -> None:
        """``conditional=False`` for buckets that do not enforce ``If-Match``:
        records are then written blindly, which is safe only with a single
        instance (or sticky sessions); see docs/scaling.md."""
        self._client = client
        self._layout = layout
        self._conditional = conditional
        self._known: OrderedDict[str, tuple[str, Record]] = OrderedDict()

    def known(self, name: str, etag: str | None) -> Record | None:
        """The record of ``name`` at version ``etag`` if this process has seen
        it. Possibly stale: a conditional write at ``etag`` is the check."""
        entry = self._known.get(name)
        return entry[1] if entry is not None and etag is not None and entry[0] == etag else None

    def _remember(self, record: Record, etag: str) -> None:
        self._known[record.name] = (etag, record)
        self._known.move_to_end(record.name)
        while len(self._known) > _KNOWN_RECORDS:
            self._known.popitem(last=False)

    async def read(self, name: str) -> tuple[Record, str] | None:
        """The record of ``name`` and its ETag; None if there is none."""
        loaded = await self._client.get_bytes(self._layout.record_key(name))
        if loaded is None:
            self._known.pop(name, None)
            return None
        raw, etag = loaded
        try:
            record = Record.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("session record of %r is damaged: %r", name, exc)
            raise StorageUnavailable(f"the session record of {name!r} is unreadable") from None
        self._remember(record, etag)
        return record, etag

    async def load(self, name: str) -> tuple[Record, str]:
        """Like ``read``, but ``UploadNotFound`` if there is no record."""
        loaded = await self.read(name)
        if loaded is None:
            raise UploadNotFound(f"no upload in progress for {name!r}")
        return loaded

    async def put(self, record: Record, *, if_match: str | None) -> str:
        """Write the record if its current ETag is ``if_match`` (None: if there
        is none); return its new ETag (the version). ``OffsetMismatch`` when
        another writer changed it, ``UploadNotFound`` when it is gone."""
        params: dict[str, Any] = {
            "Key": self._layout.record_key(record.name),
            "Body": record.to_json(),
            "ContentType": "application/json",
        }
        if self._conditional:
            if if_match is None:
                params["IfNoneMatch"] = "*"
            else:
                params["IfMatch"] = if_match
        try:
            result = await self._client.call(
                "PutObject", CONFLICT_CODES | MISSING_KEY_CODES, **params
            )
        except S3Refusal as exc:
            if exc.code in MISSING_KEY_CODES:
                raise UploadNotFound(f"the upload {record.name!r} was cancelled") from None
            current = await self.read(record.name)
            if current is None:
                raise UploadNotFound(f"the upload {record.name!r} was cancelled") from None
            raise OffsetMismatch(
                f"another writer changed {record.name!r}; it holds {current[0].offset} bytes",
                offset=current[0].offset,
            ) from None
        etag = str(result["ETag"])
        self._remember(record, etag)
        return etag

    async def delete(self, name: str) -> None:
        self._known.pop(name, None)
        await self._client.call("DeleteObject", Key=self._layout.record_key(name))

    async def scan(self) -> AsyncIterator[tuple[str, dict[str, Any], tuple[bytes, str] | None]]:
        """Every session record's key, listing entry and (body, ETag), None if
        it was deleted meanwhile; in listing order, ``READ_CONCURRENCY`` GETs in
        flight, so memory stays at one listing page plus that many records."""
        window: deque[tuple[dict[str, Any], asyncio.Task[tuple[bytes, str] | None]]] = deque()
        try:
            async with aclosing(self._client.list_objects(self._layout.sessions_root)) as items:
                async for item in items:
                    read = self._client.get_bytes(str(item["Key"]))
                    window.append((item, asyncio.create_task(read)))
                    if len(window) >= READ_CONCURRENCY:
                        first, task = window.popleft()
                        yield str(first["Key"]), first, await task
            while window:
                first, task = window.popleft()
                yield str(first["Key"]), first, await task
        finally:
            # The consumer stopped early, or a read or the listing failed.
            for _, task in window:
                task.cancel()
            if window:
                await asyncio.gather(*(task for _, task in window), return_exceptions=True)

    async def parsed(self) -> AsyncIterator[tuple[str, dict[str, Any], Record | None, str]]:
        """``scan`` with each record parsed (None, logged, when damaged), and
        its ETag; records deleted meanwhile are left out."""
        async with aclosing(self.scan()) as records:
            async for key, item, loaded in records:
                if loaded is not None:
                    yield key, item, parse_listed(key, loaded[0]), loaded[1]
