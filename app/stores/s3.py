"""S3 store: one multipart upload (MPU) per upload, state kept in the bucket.

Layout under the configured ``prefix``::

    {prefix}{name}                                    the finished object
    {prefix}.uploads/sessions/{sha256(name)}.json     session record (JSON)
    {prefix}.uploads/staged/{session_id}/{start:020d}-{token}
                                                      tail bytes not yet in a part
    {prefix}.uploads/callbacks/{id}                   pending completion callbacks

Part ``n`` (1-based) holds bytes ``[(n-1)*P, n*P)``; every part but the last is
exactly ``P``, fixed in the record at creation. Bytes past the last full part
are *staged*: each write's remainder becomes its own small object keyed by its
start offset, and when a part fills, the staged segments plus the new bytes are
uploaded as that part. The key also carries a token unique to the write, and
the record names the exact segments that are valid: a writer that loses the
race for the record can never overwrite staged bytes the winner recorded, and
orphans of a crashed write are never read (they are swept on finish/cancel).

The record's ETag is the ``UploadInfo.version``; every record update is a
conditional PUT (``IfMatch``/``IfNoneMatch``), so two processes can never both
advance one upload. Nothing here ever touches local disk.

Crashes leave garbage that no request path can see: a multipart upload whose
``create`` died before its record was written, a record whose multipart upload
was aborted (a ``cancel`` that died half-way), staged objects of a losing or
crashed write. ``find_orphans``/``remove_orphan`` (the cleanup job's
``OrphanSweeper``) find and remove them. They assume no other store, or
anything else, keeps multipart uploads under this store's prefix.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
)
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import google_crc32c
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from app.cleanup import NotAnOrphan, Orphan
from app.config import StorageConfig
from app.digests import crc32c_b64, crc32c_extend
from app.errors import (
    BadRequest,
    OffsetMismatch,
    StorageUnavailable,
    TooLarge,
    TotalMismatch,
    UploadError,
    UploadNotFound,
)
from app.metrics import instrument_s3_client
from app.protocol import MAX_OBJECT_SIZE, MAX_PARTS, RESERVED_PREFIX, choose_part_size
from app.stores.base import CompletedObject, UploadInfo

if TYPE_CHECKING:
    from app.metrics import Metrics

log = logging.getLogger("app.stores.s3")

_RECORD_FORMAT = 1
#: Object metadata key tying a finished object to the session that wrote it, so a
#: retried finish can tell "already completed by me" from "gone".
_SESSION_META = "upload-session"
#: Past this many staged segments in one part, a write folds them into one
#: object, so a client sending tiny chunks cannot grow the record without bound.
_MAX_STAGED_SEGMENTS = 32
#: The staged-bytes cache holds this many (configured) parts' worth in total.
_CACHE_PARTS = 4
_DELETE_BATCH = 1000
#: S3 requests one listing pass keeps in flight (record reads, ListParts of
#: orphan candidates): one GET per record is the price of the layout, and done
#: one at a time it dominates a big listing; more would crowd the pool the
#: uploads share.
_READ_CONCURRENCY = 16
_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError)
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_NO_UPLOAD_CODES = frozenset({"NoSuchUpload"})
#: Providers without conditional deletes answer DeleteObject + If-Match so.
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "501"})
_HEADER_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_CAMEL_WORD = re.compile(r"(?<!^)(?=[A-Z])")

_T = TypeVar("_T")
_R = TypeVar("_R")


class _S3Refusal(Exception):
    """A ClientError whose code the caller asked to handle itself. Private: every
    call site catches it, so it never leaves this module."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation}: {code}")
        self.operation = operation
        self.code = code
        self.message = message


# -- the session record ------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
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
class _Record:
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
    staged: tuple[_Segment, ...] = ()
    #: CRC32C of the staged bytes alone: the start of the next part's checksum.
    tail_crc32c: int = 0
    completed: CompletedObject | None = None

    def to_json(self) -> bytes:
        done = self.completed
        doc: dict[str, Any] = {
            "format": _RECORD_FORMAT,
            "name": self.name,
            "session_id": self.session_id,
            "upload_id": self.upload_id,
            "offset": self.offset,
            "total": self.total,
            "part_size": self.part_size,
            "crc32c": self.crc32c,
            "content_type": self.content_type,
            "metadata": self.metadata,
            "owner": self.owner,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "checksum_algorithm": self.checksum_algorithm,
            "staged": [[s.start, s.length, s.crc32c, s.token] for s in self.staged],
            "tail_crc32c": self.tail_crc32c,
            "completed": None if done is None else done.to_json(),
        }
        # ASCII escapes keep any metadata text encodable.
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> _Record:
        doc = json.loads(raw)
        done = doc.get("completed")
        return cls(
            name=str(doc["name"]),
            session_id=str(doc["session_id"]),
            upload_id=str(doc["upload_id"]),
            offset=int(doc["offset"]),
            total=None if doc["total"] is None else int(doc["total"]),
            part_size=int(doc["part_size"]),
            crc32c=int(doc["crc32c"]),
            content_type=str(doc["content_type"]),
            metadata={str(k): str(v) for k, v in doc.get("metadata", {}).items()},
            owner=None if doc.get("owner") is None else str(doc["owner"]),
            created_at=float(doc["created_at"]),
            updated_at=float(doc["updated_at"]),
            checksum_algorithm=doc.get("checksum_algorithm"),
            staged=tuple(
                _Segment(int(a), int(b), int(c), str(t)) for a, b, c, t in doc.get("staged", [])
            ),
            tail_crc32c=int(doc.get("tail_crc32c", 0)),
            completed=None if done is None else CompletedObject.from_json(done),
        )

    def to_info(self, version: str) -> UploadInfo:
        return UploadInfo(
            name=self.name,
            session_id=self.session_id,
            offset=self.offset,
            total=self.total,
            part_size=self.part_size,
            crc32c=self.crc32c,
            content_type=self.content_type,
            metadata=dict(self.metadata),
            owner=self.owner,
            created_at=self.created_at,
            updated_at=self.updated_at,
            completed=self.completed,
            version=version,
        )


# -- the staged-bytes cache --------------------------------------------------


class _StagedCache:
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


# -- what an orphan sweep lists ------------------------------------------------


@dataclass(frozen=True)
class _ListedUpload:
    """One entry of ListMultipartUploads."""

    key: str
    upload_id: str
    initiated: float


@dataclass
class _SessionIndex:
    """What one pass over the session records tells an orphan sweep."""

    #: Listed upload ids an unfinished record refers to (a completed upload's
    #: multipart upload is garbage if it still exists).
    upload_ids: set[str] = field(default_factory=set)
    #: Session id -> (record key, staged leaves it names), unfinished uploads
    #: only: a completed record names no staged data.
    sessions: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)
    #: Keys of records that could not be parsed: what they refer to is unknown.
    unreadable: set[str] = field(default_factory=set)
    #: Unfinished records old enough whose multipart upload was not listed:
    #: (record, its key, bytes it holds, its last change).
    without_upload: list[tuple[_Record, str, int, float]] = field(default_factory=list)


# -- one write in progress -----------------------------------------------------


@dataclass
class _WriteState:
    """Bookkeeping shared by a write's main loop and its part-upload tasks."""

    record: _Record
    etag: str
    #: Settled total for this write (the record's or the one ``write`` got).
    total: int | None
    #: Staged segments at the start of the write: the prefix of its first part.
    prefix: tuple[_Segment, ...]
    first_part: int
    #: Highest part number the record covers; parts above it are not durable yet.
    committed_part: int
    semaphore: asyncio.Semaphore
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    #: Part number -> (offset at its end, CRC32C of [0, that offset)).
    boundaries: dict[int, tuple[int, int]] = field(default_factory=dict)
    failure: BaseException | None = None
    buffered: int = 0

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc


# -- the store -----------------------------------------------------------------


class S3Store:
    """The ``Store`` contract on S3 multipart uploads (see ``app.stores.base``).

    Also a ``HealthCheck`` and a ``CallbackOutbox``.
    """

    def __init__(self, config: StorageConfig, client: Any, stack: AsyncExitStack) -> None:
        self._config = config
        self._s3 = config.s3
        self._client = client
        self._stack = stack
        self._bucket = str(config.s3.bucket)
        self._prefix = config.s3.prefix
        self._reserved = f"{self._prefix}{RESERVED_PREFIX}/"
        self._checksums = config.s3.checksum_mode == "when_supported"
        self._cache = _StagedCache(_CACHE_PARTS * config.part_size)
        self._instance = uuid.uuid4().hex
        #: Staged orphan key -> the record key of its session when the last
        #: ``find_orphans`` ran (None: no unfinished record had the session).
        self._staged_owners: dict[str, str | None] = {}
        self._buffered = 0
        self._peak_buffered = 0

    @classmethod
    async def open(cls, config: StorageConfig) -> S3Store:
        s3 = config.s3
        if not s3.bucket:
            raise StorageUnavailable("S3 store: no bucket configured (storage.s3.bucket)")
        boto_config = AioConfig(
            region_name=s3.region,
            s3={"addressing_style": s3.addressing_style,
                "payload_signing_enabled": s3.payload_signing},
            request_checksum_calculation=s3.checksum_mode,
            response_checksum_validation=s3.checksum_mode,
            connect_timeout=s3.connect_timeout,
            read_timeout=s3.read_timeout,
            retries={"max_attempts": s3.max_attempts, "mode": "standard"},
            # Many uploads each run parts_in_flight part uploads plus record and
            # staged requests; a small pool would queue them behind each other.
            max_pool_connections=max(64, 8 * config.parts_in_flight),
        )
        stack = AsyncExitStack()
        try:
            # Credentials come from the standard AWS chain only (env, profile, role).
            client = await stack.enter_async_context(
                get_session().create_client("s3", endpoint_url=s3.endpoint_url, config=boto_config)
            )
        except _TRANSPORT_ERRORS as exc:
            await stack.aclose()
            raise StorageUnavailable(f"S3 store: cannot create the S3 client: {exc}") from None
        store = cls(config, client, stack)
        if s3.create_bucket:
            try:
                await store._ensure_bucket()
            except BaseException:
                await stack.aclose()
                raise
        return store

    async def close(self) -> None:
        await self._stack.aclose()

    # -- metrics ------------------------------------------------------------

    def attach_metrics(self, metrics: Metrics) -> None:
        """``MetricsAware``: count this store's S3 calls in ``metrics``."""
        instrument_s3_client(self._client, metrics)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of part buffers this store holds right now (all uploads)."""
        return self._buffered

    @property
    def peak_buffered_bytes(self) -> int:
        """Highest ``buffered_bytes`` since the last ``reset_peak_buffered``."""
        return self._peak_buffered

    def reset_peak_buffered(self) -> None:
        self._peak_buffered = self._buffered

    @property
    def cached_staged_bytes(self) -> int:
        return self._cache.size

    def _hold(self, state: _WriteState | None, size: int) -> None:
        self._buffered += size
        self._peak_buffered = max(self._peak_buffered, self._buffered)
        if state is not None:
            state.buffered += size

    def _release(self, state: _WriteState | None, size: int) -> None:
        self._buffered -= size
        if state is not None:
            state.buffered -= size

    # -- Store ----------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        total: int | None,
        content_type: str,
        metadata: Mapping[str, str],
        owner: str | None,
    ) -> UploadInfo:
        if total is not None and total < 0:
            raise TotalMismatch(f"the total size cannot be negative ({total})")
        if total is not None and total > MAX_OBJECT_SIZE:
            raise TooLarge(f"{total} bytes is more than S3's largest object ({MAX_OBJECT_SIZE})")
        part_size = choose_part_size(total, self._config.part_size)
        session_id = uuid.uuid4().hex
        object_metadata = _object_metadata(metadata, session_id)
        old = await self._read_record(name)
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._object_key(name),
            "ContentType": content_type,
            "Metadata": object_metadata,
        }
        if self._checksums:
            params["ChecksumAlgorithm"] = "CRC32C"
        try:
            created = await self._call("CreateMultipartUpload", {"MetadataTooLarge"}, **params)
        except _S3Refusal as exc:
            raise BadRequest(f"the upload's metadata is too large for S3: {exc.message}") from None
        now = time.time()
        record = _Record(
            name=name,
            session_id=session_id,
            upload_id=str(created["UploadId"]),
            offset=0,
            total=total,
            part_size=part_size,
            crc32c=0,
            content_type=content_type,
            metadata=dict(metadata),
            owner=owner,
            created_at=now,
            updated_at=now,
            checksum_algorithm="CRC32C" if self._checksums else None,
        )
        try:
            try:
                etag = await self._put_record(record, if_match=None if old is None else old[1])
            except UploadNotFound:
                # The old session was cancelled meanwhile: nothing left to replace.
                old = None
                etag = await self._put_record(record, if_match=None)
        except UploadError:
            await self._abort_quietly(name, record.upload_id)
            raise
        if old is not None and old[0].completed is None:
            # The new record is in place first: a crash here leaves garbage to
            # sweep, never a record pointing at an aborted upload.
            await self._discard_session_data(old[0], quiet=True)
        log.debug("created S3 upload for %r (session %s)", name, session_id)
        return record.to_info(etag)

    async def get(self, name: str) -> UploadInfo:
        record, etag = await self._load_record(name)
        return record.to_info(etag)

    async def write(
        self,
        info: UploadInfo,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
    ) -> UploadInfo:
        if info.completed is not None:
            raise UploadNotFound(f"the upload {info.name!r} is already complete")
        # A fresh read costs one small GET and means a stale writer is refused
        # before it can overwrite a part another writer already uploaded.
        record, etag = await self._load_record(info.name)
        if record.completed is not None:
            raise UploadNotFound(f"the upload {info.name!r} is already complete")
        if record.session_id != info.session_id:
            raise OffsetMismatch(
                f"{info.name!r} was replaced by a new upload holding {record.offset} bytes",
                offset=record.offset,
            )
        if record.offset != info.offset:
            raise OffsetMismatch(
                f"{info.name!r} holds {record.offset} bytes, not {info.offset}",
                offset=record.offset,
            )
        settled = self._settle_total(record, total)
        first_part = record.offset // record.part_size + 1
        state = _WriteState(
            record=record,
            etag=etag,
            total=settled,
            prefix=record.staged,
            first_part=first_part,
            committed_part=first_part - 1,
            semaphore=asyncio.Semaphore(self._config.parts_in_flight),
        )
        try:
            return await self._write(state, chunks)
        finally:
            for task in state.tasks:
                task.cancel()
            if state.tasks:
                await asyncio.gather(*state.tasks, return_exceptions=True)
            if state.buffered:
                self._release(state, state.buffered)

    async def finish(self, info: UploadInfo, *, md5: bytes | None = None) -> UploadInfo:
        if info.completed is not None:
            return info
        record, etag = await self._load_record(info.name)
        if record.session_id != info.session_id:
            raise OffsetMismatch(
                f"{info.name!r} was replaced by a new upload holding {record.offset} bytes",
                offset=record.offset,
            )
        if record.completed is not None:
            return record.to_info(etag)
        if record.total is None:
            raise BadRequest(
                f"the total size of {info.name!r} is not known yet; it cannot be finished"
            )
        if record.offset != record.total:
            raise BadRequest(
                f"{info.name!r} holds {record.offset} of {record.total} bytes; "
                "it cannot be finished yet"
            )
        completed = replace(await self._complete(record), md5=md5)
        done = replace(record, completed=completed, staged=(), tail_crc32c=0,
                       updated_at=completed.completed_at)
        try:
            etag = await self._put_record(done, if_match=etag)
        except (OffsetMismatch, UploadNotFound):
            # Another process may have finished the same session first.
            again = await self._read_record(info.name)
            if again is not None and again[0].session_id == record.session_id \
                    and again[0].completed is not None:
                return again[0].to_info(again[1])
            raise
        await self._delete_prefix(self._staged_prefix(record.session_id), quiet=True)
        self._cache.drop(record.session_id)
        return done.to_info(etag)

    async def cancel(self, name: str) -> None:
        record, _ = await self._load_record(name)
        if record.completed is None:
            await self._discard_session_data(record, quiet=False)
        # A completed upload only loses its record: the object is the client's.
        await self._call("DeleteObject", Bucket=self._bucket, Key=self._record_key(name))

    async def list_unfinished(self) -> AsyncIterator[UploadInfo]:
        async with aclosing(self._scan_records()) as records:
            async for item, loaded in records:
                if loaded is None:
                    continue  # finished/cancelled while listing
                record = _parse_listed(str(item["Key"]), loaded[0])
                if record is not None and record.completed is None:
                    yield record.to_info(loaded[1])

    # -- HealthCheck --------------------------------------------------------

    async def check_health(self) -> None:
        key = f"{self._reserved}health/{self._instance}"
        await self._call("PutObject", Bucket=self._bucket, Key=key, Body=b"ok")
        await self._call("DeleteObject", Bucket=self._bucket, Key=key)

    # -- CallbackOutbox -----------------------------------------------------

    async def save_pending(self, callback_id: str, payload: bytes) -> None:
        doc = {
            "id": callback_id,
            "payload": base64.b64encode(bytes(payload)).decode("ascii"),
            "saved_at": time.time(),
        }
        await self._call(
            "PutObject", Bucket=self._bucket, Key=self._callback_key(callback_id),
            Body=json.dumps(doc).encode("ascii"), ContentType="application/json",
        )

    async def delete_pending(self, callback_id: str) -> None:
        await self._call("DeleteObject", Bucket=self._bucket, Key=self._callback_key(callback_id))

    async def list_pending(self) -> list[tuple[str, bytes]]:
        found: list[tuple[float, str, bytes]] = []
        async for key in self._list_keys(f"{self._reserved}callbacks/"):
            loaded = await self._get_bytes(key)
            if loaded is None:
                continue  # delivered while listing
            try:
                doc = json.loads(loaded[0])
                found.append(
                    (float(doc["saved_at"]), str(doc["id"]), base64.b64decode(doc["payload"]))
                )
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping damaged callback record %s: %r", key, exc)
        found.sort(key=lambda item: item[0])
        return [(callback_id, payload) for _, callback_id, payload in found]

    # -- OrphanSweeper -------------------------------------------------------

    async def find_orphans(self, older_than: float, now: float) -> list[Orphan]:
        cutoff = now - older_than
        # Uploads are listed first, records next, staged data last. A session
        # started after a listing is then either seen by a later one or younger
        # than the cutoff, so a fresh upload never looks orphaned.
        uploads = [upload async for upload in self._list_uploads()]
        index = await self._index_sessions({u.upload_id for u in uploads}, cutoff)
        if index.unreadable:
            log.warning("%d session records are unreadable: multipart uploads and staged "
                        "data they may refer to are not swept", len(index.unreadable))
        orphans = await self._orphan_uploads(uploads, index, cutoff)
        orphans += await self._orphan_records(index)
        orphans += await self._orphan_staged(index, cutoff)
        return orphans

    async def remove_orphan(self, orphan: Orphan) -> int:
        if orphan.kind == "multipart_upload":
            return await self._remove_upload(orphan)
        if orphan.kind == "staged_data":
            return await self._remove_staged(orphan)
        if orphan.kind == "session_record":
            return await self._remove_record(orphan)
        raise NotAnOrphan(f"the S3 store has no orphans of kind {orphan.kind!r}")

    async def _index_sessions(self, listed_ids: set[str], cutoff: float) -> _SessionIndex:
        """One pass over the records: what they refer to, and the unfinished
        ones whose multipart upload was not in ``listed_ids``."""
        index = _SessionIndex()
        async with aclosing(self._scan_records()) as records:
            async for item, loaded in records:
                key = str(item["Key"])
                if loaded is None:
                    continue  # deleted since it was listed: it refers to nothing now
                record = _parse_listed(key, loaded[0])
                if record is None:
                    index.unreadable.add(key)
                    continue
                if record.completed is not None:
                    # Its multipart upload is gone, unless the abort after an
                    # empty upload's PutObject failed: that one is garbage.
                    continue
                if record.upload_id in listed_ids:
                    index.upload_ids.add(record.upload_id)
                index.sessions[record.session_id] = (
                    key, frozenset(segment.leaf for segment in record.staged)
                )
                changed = max(_timestamp(item.get("LastModified")), record.updated_at)
                if record.upload_id not in listed_ids and changed <= cutoff:
                    size = len(loaded[0]) + sum(segment.length for segment in record.staged)
                    index.without_upload.append((record, key, size, changed))
        return index

    async def _orphan_uploads(
        self, uploads: list[_ListedUpload], index: _SessionIndex, cutoff: float
    ) -> list[Orphan]:
        candidates = [
            upload for upload in uploads
            if upload.initiated <= cutoff
            and upload.upload_id not in index.upload_ids
            and self._record_key(upload.key[len(self._prefix):]) not in index.unreadable
        ]
        # Sized now so that a dry run can tell what a sweep would free.
        sizes = await _bounded_map(lambda u: self._upload_size(u.key, u.upload_id), candidates)
        return [
            Orphan("multipart_upload", upload.key, upload_id=upload.upload_id, size=size,
                   last_modified=upload.initiated)
            for upload, size in zip(candidates, sizes, strict=True)
            if size is not None  # aborted or completed since it was listed
        ]

    async def _orphan_records(self, index: _SessionIndex) -> list[Orphan]:
        alive = await _bounded_map(lambda entry: self._why_alive(entry[0]),
                                   index.without_upload)
        return [
            Orphan("session_record", key, size=size, last_modified=changed)
            for (_, key, size, changed), reason in zip(index.without_upload, alive, strict=True)
            if reason is None
        ]

    async def _orphan_staged(self, index: _SessionIndex, cutoff: float) -> list[Orphan]:
        root = self._staged_root()
        self._staged_owners = {}
        orphans: list[Orphan] = []
        async with aclosing(self._list_objects(root)) as items:
            async for item in items:
                key = str(item["Key"])
                session_id, _, leaf = key[len(root):].partition("/")
                changed = _timestamp(item.get("LastModified"))
                if not session_id or not leaf or changed > cutoff:
                    continue
                owner = index.sessions.get(session_id)
                if owner is not None and leaf in owner[1]:
                    continue
                if owner is None and index.unreadable:
                    continue  # the session may be one of the unreadable records
                orphans.append(Orphan("staged_data", key, size=int(item.get("Size", 0)),
                                      last_modified=changed))
                self._staged_owners[key] = None if owner is None else owner[0]
        return orphans

    async def _remove_upload(self, orphan: Orphan) -> int:
        upload_id = orphan.upload_id
        if upload_id is None or not orphan.key.startswith(self._prefix):
            raise NotAnOrphan("not a multipart upload of this store")
        size = await self._upload_size(orphan.key, upload_id)
        if size is None:
            return 0  # aborted by someone else meanwhile
        # Checked last, right before the abort: a create that was slow to
        # write its record may have done so since the sweep listed it.
        name = orphan.key[len(self._prefix):]
        current = await self._read_record(name)
        if current is not None and current[0].upload_id == upload_id \
                and current[0].completed is None:
            raise NotAnOrphan(f"the session record of {name!r} refers to it")
        try:
            await self._call("AbortMultipartUpload", _NO_UPLOAD_CODES, Bucket=self._bucket,
                             Key=orphan.key, UploadId=upload_id)
        except _S3Refusal:
            return 0
        return size

    async def _remove_record(self, orphan: Orphan) -> int:
        if not (orphan.key.startswith(f"{self._reserved}sessions/")
                and orphan.key.endswith(".json")):
            raise NotAnOrphan("not a session record of this store")
        loaded = await self._get_bytes(orphan.key)
        if loaded is None:
            return 0
        raw, etag = loaded
        record = _parse_listed(orphan.key, raw)
        # Every record write moves updated_at: a later one means the upload
        # was replaced, resumed or finished since the sweep looked at it.
        if record is None or record.completed is not None \
                or record.updated_at > orphan.last_modified:
            raise NotAnOrphan("the session record changed since it was found")
        reason = await self._why_alive(record)
        if reason is not None:
            raise NotAnOrphan(reason)
        if not await self._delete_if_match(orphan.key, etag):
            return 0
        # With the record gone nothing can read its staged data any more.
        await self._delete_keys(
            [self._staged_key(record.session_id, segment) for segment in record.staged],
            quiet=True,
        )
        self._cache.drop(record.session_id)
        return len(raw) + sum(segment.length for segment in record.staged)

    async def _remove_staged(self, orphan: Orphan) -> int:
        root = self._staged_root()
        session_id, _, leaf = orphan.key[len(root):].partition("/")
        if not orphan.key.startswith(root) or not session_id or not leaf:
            raise NotAnOrphan("not staged data of this store")
        head = await self._head(orphan.key)
        if head is None:
            return 0
        # HEAD dates have whole seconds, listings may have milliseconds.
        if _timestamp(head.get("LastModified")) > orphan.last_modified + 1:
            raise NotAnOrphan("it was rewritten since it was found")
        if orphan.key in self._staged_owners:
            owner = self._staged_owners[orphan.key]
        else:
            owner = await self._session_record_key(session_id)
        # A session that had no record cannot get one back (ids are never
        # reused), so only a record that existed needs reading again.
        if owner is not None:
            loaded = await self._get_bytes(owner)
            record = None if loaded is None else _parse_listed(owner, loaded[0])
            if loaded is not None and record is None:
                raise NotAnOrphan("its session record is unreadable")
            if record is not None and record.session_id == session_id \
                    and record.completed is None \
                    and any(segment.leaf == leaf for segment in record.staged):
                raise NotAnOrphan("its upload refers to it")
        if not await self._delete_if_match(orphan.key, str(head["ETag"])):
            return 0
        self._staged_owners.pop(orphan.key, None)
        self._cache.drop(session_id, [leaf])
        return int(head.get("ContentLength", 0))

    async def _why_alive(self, record: _Record) -> str | None:
        """Why an unfinished record is still in use; None if it is not."""
        try:
            await self._call(
                "ListParts", _NO_UPLOAD_CODES, Bucket=self._bucket,
                Key=self._object_key(record.name), UploadId=record.upload_id, MaxParts=1,
            )
            return "its multipart upload exists"
        except _S3Refusal:
            pass
        head = await self._head(self._object_key(record.name))
        if head is not None and head.get("Metadata", {}).get(_SESSION_META) == record.session_id:
            # A finish completed the object but died before updating the
            # record; a retried finish still needs the record to answer.
            return "its upload was finished"
        return None

    async def _session_record_key(self, session_id: str) -> str | None:
        """The key of the unfinished record of ``session_id``, by a full pass
        (for an orphan that ``find_orphans`` of this instance did not return)."""
        async with aclosing(self._scan_records()) as records:
            async for item, loaded in records:
                if loaded is None:
                    continue
                record = _parse_listed(str(item["Key"]), loaded[0])
                if record is None:
                    raise NotAnOrphan("some session records are unreadable")
                if record.session_id == session_id and record.completed is None:
                    return str(item["Key"])
        return None

    async def _delete_if_match(self, key: str, etag: str) -> bool:
        """Delete ``key`` if it is still the version with ``etag``; False if it
        is gone already, ``NotAnOrphan`` if it changed."""
        try:
            await self._call(
                "DeleteObject", _CONFLICT_CODES | _MISSING_KEY_CODES | _UNSUPPORTED_CODES,
                Bucket=self._bucket, Key=key, IfMatch=etag,
            )
        except _S3Refusal as exc:
            if exc.code in _MISSING_KEY_CODES:
                return False
            if exc.code in _CONFLICT_CODES:
                raise NotAnOrphan("it changed while it was checked") from None
            # No conditional deletes on this provider: the checks just made
            # are all the guard there is.
            await self._call("DeleteObject", Bucket=self._bucket, Key=key)
        return True

    async def _upload_size(self, key: str, upload_id: str) -> int | None:
        """Bytes in a multipart upload's parts; None if it no longer exists."""
        try:
            parts = await self._parts(key, upload_id)
        except _S3Refusal:
            return None
        return sum(int(part.get("Size", 0)) for part in parts.values())

    async def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return await self._call("HeadObject", _MISSING_KEY_CODES, Bucket=self._bucket,
                                    Key=key)
        except _S3Refusal:
            return None

    # -- keys -----------------------------------------------------------------

    def _object_key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def _record_key(self, name: str) -> str:
        # Hashed: names may be 1024 bytes, the whole key may not exceed that.
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self._reserved}sessions/{digest}.json"

    def _staged_root(self) -> str:
        return f"{self._reserved}staged/"

    def _staged_prefix(self, session_id: str) -> str:
        return f"{self._staged_root()}{session_id}/"

    def _staged_key(self, session_id: str, segment: _Segment) -> str:
        return f"{self._staged_prefix(session_id)}{segment.leaf}"

    def _callback_key(self, callback_id: str) -> str:
        return f"{self._reserved}callbacks/{callback_id}"

    # -- the write path -----------------------------------------------------

    def _settle_total(self, record: _Record, total: int | None) -> int | None:
        if total is None or total == record.total:
            return record.total
        if record.total is not None:
            raise TotalMismatch(
                f"total {total} contradicts the declared total {record.total} of {record.name!r}"
            )
        if total < record.offset:
            raise TotalMismatch(
                f"total {total} is less than the {record.offset} bytes already stored"
            )
        if total > record.part_size * MAX_PARTS:
            raise TooLarge(
                f"{total} bytes need more than {MAX_PARTS} parts of {record.part_size} bytes "
                "(the part size was fixed when the upload started without a total)"
            )
        return total

    async def _write(self, state: _WriteState, chunks: AsyncIterable[bytes]) -> UploadInfo:
        record = state.record
        size = record.part_size
        limit = state.total if state.total is not None else size * MAX_PARTS
        cur = record.offset
        crc = record.crc32c
        number = state.first_part
        part_start = (number - 1) * size
        part_len = min(size, limit - part_start)
        pos = new_from = prefix_len = cur - part_start
        part_crc = record.tail_crc32c if prefix_len else 0
        buf: bytearray | None = None
        overflow: UploadError | None = None
        stream_error: BaseException | None = None

        stream = aiter(chunks)
        while overflow is None and state.failure is None:
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                break
            except BaseException as exc:
                # The client went away mid-body, or the caller was cancelled while
                # waiting for it: keep what arrived, then re-raise. (A cancellation
                # that lands in one of our own awaits stops the write instead.)
                stream_error = exc
                break
            if not chunk:
                continue
            data = chunk if isinstance(chunk, bytes) else bytes(chunk)
            room = limit - cur
            if len(data) > room:
                data = data[:room]
                overflow = (
                    TotalMismatch(
                        f"more bytes than the declared total of {limit} for {record.name!r}"
                    )
                    if state.total is not None
                    else TooLarge(
                        f"an upload of unknown size can hold at most {MAX_PARTS} parts "
                        f"of {size} bytes ({limit} bytes)"
                    )
                )
            i = 0
            while i < len(data):
                if buf is None:
                    buf = bytearray(part_len)
                    self._hold(state, part_len)
                n = min(len(data) - i, part_len - pos)
                # Only a chunk that straddles a part boundary is sliced (copied).
                piece = data if n == len(data) else data[i : i + n]
                crc = crc32c_extend(crc, piece)
                if record.checksum_algorithm:
                    part_crc = crc32c_extend(part_crc, piece)
                buf[pos : pos + n] = piece
                pos += n
                i += n
                cur += n
                if pos == part_len:
                    launched = await self._launch_part(
                        state, number, buf, prefix_len, part_crc, cur, crc
                    )
                    if not launched:
                        break
                    buf = None
                    number += 1
                    part_start += part_len
                    part_len = min(size, limit - part_start)
                    pos = new_from = prefix_len = 0
                    part_crc = 0
        if stream_error is None and (overflow is not None or state.failure is not None):
            await _close_quietly(stream)

        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)
        if state.failure is not None:
            await self._end_failed_write(state)
            raise _translate(state.failure, record.name) from None

        try:
            staged, tail_crc = state.record.staged, state.record.tail_crc32c
            # A staged tail is always shorter than a part: the loop uploads every
            # part it fills, so a full buffer never reaches this point.
            assert buf is None or pos < part_len
            if buf is not None and pos > new_from:
                data, start = await self._remainder(state, buf, number, new_from, pos)
                self._release(state, len(buf))
                buf = None
                segment = await self._stage(state.record, data, start)
                # A folded segment starts where the earlier ones did and replaces them.
                staged = (*(s for s in staged if s.start < start), segment)
                tail_crc = part_crc if record.checksum_algorithm else 0
            if (staged, cur, state.total) != (state.record.staged, state.record.offset,
                                              state.record.total):
                updated = replace(state.record, offset=cur, crc32c=crc, total=state.total,
                                  staged=staged, tail_crc32c=tail_crc, updated_at=time.time())
                state.etag = await self._put_record(updated, if_match=state.etag)
                state.record = updated
        except UploadError:
            # Not on cancellation: a timed-out write must not linger on cleanup.
            await self._drop_consumed(state)
            raise
        await self._drop_consumed(state)
        if stream_error is not None:
            raise stream_error
        if overflow is not None:
            raise overflow
        return state.record.to_info(state.etag)

    async def _launch_part(
        self, state: _WriteState, number: int, buf: bytearray, prefix_len: int,
        part_crc: int, end: int, end_crc: int,
    ) -> bool:
        """Start uploading a full part; False (nothing started) after a failure."""
        # Waiting here while holding the full buffer is what bounds memory to
        # (parts_in_flight + 1) parts per write.
        await state.semaphore.acquire()
        if state.failure is not None:
            # Bytes past a failed part can never become durable in this write.
            state.semaphore.release()
            return False
        state.boundaries[number] = (end, end_crc)
        task = asyncio.create_task(self._part_task(state, number, buf, prefix_len, part_crc))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
        return True

    async def _part_task(
        self, state: _WriteState, number: int, buf: bytearray, prefix_len: int, part_crc: int
    ) -> None:
        size = len(buf)
        try:
            if prefix_len:
                await self._fill_from_staged(state.record, state.prefix, buf)
            await self._upload_part(state.record, number, buf, part_crc)
            state.done.add(number)
        except Exception as exc:
            state.fail(exc)
        finally:
            del buf
            self._release(state, size)
            state.semaphore.release()
        if number in state.done:
            try:
                await self._commit_parts(state)
            except Exception as exc:
                state.fail(exc)

    async def _commit_parts(self, state: _WriteState) -> None:
        """Advance the record over the contiguous run of finished parts, so a
        crash mid-stream keeps everything up to the last such part."""
        async with state.lock:
            last = state.committed_part
            while last + 1 in state.done:
                last += 1
            if last == state.committed_part:
                return
            end, end_crc = state.boundaries[last]
            record = replace(state.record, offset=end, crc32c=end_crc, total=state.total,
                             staged=(), tail_crc32c=0, updated_at=time.time())
            state.etag = await self._put_record(record, if_match=state.etag)
            state.record = record
            state.committed_part = last

    async def _end_failed_write(self, state: _WriteState) -> None:
        """After a failed part: record whatever contiguous prefix did land."""
        try:
            await self._commit_parts(state)
        except (UploadError, _S3Refusal) as exc:
            log.warning("could not record the durable parts of %r: %s", state.record.name, exc)
        await self._drop_consumed(state)

    async def _drop_consumed(self, state: _WriteState) -> None:
        """Delete staged segments that the record no longer names (they went
        into a part, or were folded into one segment)."""
        live = set(state.record.staged)
        gone = [s for s in state.prefix if s not in live]
        if not gone:
            return
        session = state.record.session_id
        self._cache.drop(session, [s.leaf for s in gone])
        state.prefix = tuple(s for s in state.prefix if s in live)
        await self._delete_keys([self._staged_key(session, s) for s in gone], quiet=True)

    async def _remainder(
        self, state: _WriteState, buf: bytearray, number: int, new_from: int, pos: int
    ) -> tuple[bytes, int]:
        """The bytes to stage after the last full part, and their start offset."""
        record = state.record
        part_start = (number - 1) * record.part_size
        # record.staged is this part's earlier segments when no part was
        # uploaded in this write, and empty once one was.
        if record.staged and len(record.staged) + 1 > _MAX_STAGED_SEGMENTS:
            await self._fill_from_staged(record, record.staged, buf)
            new_from = 0
        return bytes(memoryview(buf)[new_from:pos]), part_start + new_from

    async def _stage(self, record: _Record, data: bytes, start: int) -> _Segment:
        """Store ``data`` (upload bytes from ``start``) as a staged object."""
        segment = _Segment(start, len(data), google_crc32c.value(data), uuid.uuid4().hex[:16])
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._staged_key(record.session_id, segment),
            "Body": data,
        }
        if self._checksums:
            params["ChecksumCRC32C"] = crc32c_b64(segment.crc32c)
        await self._call("PutObject", **params)
        self._cache.put(record.session_id, segment.leaf, data)
        return segment

    async def _fill_from_staged(
        self, record: _Record, segments: tuple[_Segment, ...], buf: bytearray
    ) -> None:
        """Copy staged segments into the head of ``buf`` (the part they start)."""
        if not segments:
            return
        base = segments[0].start // record.part_size * record.part_size
        for segment in segments:
            data = await self._read_segment(record, segment)
            at = segment.start - base
            buf[at : at + segment.length] = data

    async def _read_segment(self, record: _Record, segment: _Segment) -> bytes:
        cached = self._cache.get(record.session_id, segment.leaf)
        if cached is not None:
            return cached
        key = self._staged_key(record.session_id, segment)
        loaded = await self._get_bytes(key)
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

    async def _upload_part(
        self, record: _Record, number: int, body: bytes | bytearray, part_crc: int
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._object_key(record.name),
            "UploadId": record.upload_id,
            "PartNumber": number,
            "Body": body,
        }
        if record.checksum_algorithm:
            # S3 rejects the part if the bytes it got do not match this CRC.
            params["ChecksumCRC32C"] = crc32c_b64(part_crc)
        return await self._call("UploadPart", _NO_UPLOAD_CODES, **params)

    # -- the finish path ----------------------------------------------------

    async def _complete(self, record: _Record) -> CompletedObject:
        total = record.total
        assert total is not None
        key = self._object_key(record.name)
        if total == 0:
            # S3 cannot complete an MPU without parts.
            put = await self._call(
                "PutObject", Bucket=self._bucket, Key=key, Body=b"",
                ContentType=record.content_type,
                Metadata=_object_metadata(record.metadata, record.session_id),
            )
            await self._abort_quietly(record.name, record.upload_id)
            return self._completed(record, str(put["ETag"]), 0)
        try:
            listed = await self._list_parts(record)
            count = -(-total // record.part_size)
            if record.staged:
                tail = await self._upload_staged_tail(record)
                listed[count] = tail
            parts = self._complete_parts(record, listed, count)
            result = await self._call(
                "CompleteMultipartUpload", _NO_UPLOAD_CODES, Bucket=self._bucket, Key=key,
                UploadId=record.upload_id, MultipartUpload={"Parts": parts},
            )
        except _S3Refusal:
            return await self._completed_earlier(record)
        return self._completed(record, str(result["ETag"]), total)

    def _completed(self, record: _Record, etag: str, size: int) -> CompletedObject:
        return CompletedObject(
            key=self._object_key(record.name),
            bucket=self._bucket,
            size=size,
            etag=etag,
            crc32c=record.crc32c,
            completed_at=time.time(),
        )

    async def _completed_earlier(self, record: _Record) -> CompletedObject:
        """The MPU is gone: it is complete if the object carries this session."""
        try:
            head = await self._call(
                "HeadObject", _MISSING_KEY_CODES, Bucket=self._bucket,
                Key=self._object_key(record.name),
            )
        except _S3Refusal:
            head = None
        if head is None or head.get("Metadata", {}).get(_SESSION_META) != record.session_id:
            raise UploadNotFound(f"the multipart upload of {record.name!r} no longer exists")
        return self._completed(record, str(head["ETag"]), int(head["ContentLength"]))

    async def _list_parts(self, record: _Record) -> dict[int, dict[str, Any]]:
        return await self._parts(self._object_key(record.name), record.upload_id)

    async def _parts(self, key: str, upload_id: str) -> dict[int, dict[str, Any]]:
        """Every uploaded part (ListParts pages at 1,000); ``_S3Refusal`` when
        the multipart upload does not exist."""
        parts: dict[int, dict[str, Any]] = {}
        marker = 0
        while True:
            page = await self._call(
                "ListParts", _NO_UPLOAD_CODES, Bucket=self._bucket, Key=key,
                UploadId=upload_id, PartNumberMarker=marker,
            )
            for part in page.get("Parts", []):
                parts[int(part["PartNumber"])] = part
            if not page.get("IsTruncated"):
                return parts
            marker = int(page["NextPartNumberMarker"])

    async def _upload_staged_tail(self, record: _Record) -> dict[str, Any]:
        start = record.staged[0].start
        buf = bytearray(record.offset - start)
        self._hold(None, len(buf))
        try:
            await self._fill_from_staged(record, record.staged, buf)
            result = await self._upload_part(
                record, start // record.part_size + 1, buf, record.tail_crc32c
            )
            return {**result, "Size": len(buf)}
        finally:
            self._release(None, len(buf))

    def _complete_parts(
        self, record: _Record, listed: dict[int, dict[str, Any]], count: int
    ) -> list[dict[str, Any]]:
        assert record.total is not None
        # Checksums go in only when S3 reported one for every part: real S3
        # does (and then requires them), moto never reports them and accepts
        # a completion without.
        with_checksums = bool(record.checksum_algorithm) and all(
            listed.get(n, {}).get("ChecksumCRC32C") for n in range(1, count + 1)
        )
        parts: list[dict[str, Any]] = []
        for number in range(1, count + 1):
            part = listed.get(number)
            expected = min(record.part_size, record.total - (number - 1) * record.part_size)
            if part is None or int(part.get("Size", expected)) != expected:
                log.error("upload %r: part %d is missing or has the wrong size", record.name,
                          number)
                raise StorageUnavailable(
                    f"S3 multipart upload of {record.name!r} lacks a complete part {number}"
                )
            entry: dict[str, Any] = {"PartNumber": number, "ETag": part["ETag"]}
            if with_checksums:
                entry["ChecksumCRC32C"] = part["ChecksumCRC32C"]
            parts.append(entry)
        return parts

    # -- records and housekeeping -------------------------------------------

    async def _read_record(self, name: str) -> tuple[_Record, str] | None:
        loaded = await self._get_bytes(self._record_key(name))
        if loaded is None:
            return None
        raw, etag = loaded
        try:
            return _Record.from_json(raw), etag
        except (ValueError, KeyError, TypeError) as exc:
            log.error("session record of %r is damaged: %r", name, exc)
            raise StorageUnavailable(f"the session record of {name!r} is unreadable") from None

    async def _load_record(self, name: str) -> tuple[_Record, str]:
        loaded = await self._read_record(name)
        if loaded is None:
            raise UploadNotFound(f"no upload in progress for {name!r}")
        return loaded

    async def _put_record(self, record: _Record, *, if_match: str | None) -> str:
        """Write the record conditionally; return its new ETag (the version)."""
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._record_key(record.name),
            "Body": record.to_json(),
            "ContentType": "application/json",
        }
        if if_match is None:
            params["IfNoneMatch"] = "*"
        else:
            params["IfMatch"] = if_match
        try:
            result = await self._call("PutObject", _CONFLICT_CODES | _MISSING_KEY_CODES, **params)
        except _S3Refusal as exc:
            if exc.code in _MISSING_KEY_CODES:
                raise UploadNotFound(f"the upload {record.name!r} was cancelled") from None
            current = await self._read_record(record.name)
            if current is None:
                raise UploadNotFound(f"the upload {record.name!r} was cancelled") from None
            raise OffsetMismatch(
                f"another writer changed {record.name!r}; it holds {current[0].offset} bytes",
                offset=current[0].offset,
            ) from None
        return str(result["ETag"])

    async def _discard_session_data(self, record: _Record, *, quiet: bool) -> None:
        try:
            await self._call(
                "AbortMultipartUpload", _NO_UPLOAD_CODES, Bucket=self._bucket,
                Key=self._object_key(record.name), UploadId=record.upload_id,
            )
        except _S3Refusal:
            pass  # already aborted or completed
        except StorageUnavailable:
            if not quiet:
                raise
        await self._delete_prefix(self._staged_prefix(record.session_id), quiet=quiet)
        self._cache.drop(record.session_id)

    async def _abort_quietly(self, name: str, upload_id: str) -> None:
        try:
            await self._call("AbortMultipartUpload", _NO_UPLOAD_CODES, Bucket=self._bucket,
                             Key=self._object_key(name), UploadId=upload_id)
        except (_S3Refusal, StorageUnavailable):
            pass  # logged by _call; an unaborted MPU only costs storage until lifecycle rules

    async def _delete_prefix(self, prefix: str, *, quiet: bool) -> None:
        try:
            keys = [key async for key in self._list_keys(prefix)]
        except StorageUnavailable:
            if quiet:
                return
            raise
        await self._delete_keys(keys, quiet=quiet)

    async def _delete_keys(self, keys: list[str], *, quiet: bool) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            try:
                result = await self._call(
                    "DeleteObjects", Bucket=self._bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except StorageUnavailable:
                if quiet:
                    return
                raise
            errors = result.get("Errors") or []
            if errors:
                log.warning("S3 DeleteObjects left %d keys, first: %s", len(errors), errors[0])
                if not quiet:
                    raise StorageUnavailable(
                        f"S3 DeleteObjects failed for {len(errors)} keys: "
                        f"{errors[0].get('Code')}"
                    )

    async def _list_keys(self, prefix: str) -> AsyncIterator[str]:
        async with aclosing(self._list_objects(prefix)) as items:
            async for item in items:
                yield str(item["Key"])

    async def _list_objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        """ListObjectsV2 entries (Key, Size, LastModified, ...) under ``prefix``."""
        params: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix}
        while True:
            page = await self._call("ListObjectsV2", **params)
            for item in page.get("Contents", []):
                yield item
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token or token == params.get("ContinuationToken"):
                # Stopping here would pass a partial listing off as complete,
                # and an orphan sweep would take what it missed for garbage.
                raise StorageUnavailable("S3 ListObjectsV2 returned no usable continuation")
            params["ContinuationToken"] = token

    async def _list_uploads(self) -> AsyncIterator[_ListedUpload]:
        """Every multipart upload under the prefix (ListMultipartUploads pages at 1,000)."""
        params: dict[str, Any] = {"Bucket": self._bucket, "Prefix": self._prefix}
        while True:
            page = await self._call("ListMultipartUploads", **params)
            for upload in page.get("Uploads", []):
                key = str(upload["Key"])
                # Even a backend that ignores Prefix must not widen a sweep.
                if key.startswith(self._prefix):
                    yield _ListedUpload(key, str(upload["UploadId"]),
                                        _timestamp(upload.get("Initiated")))
            if not page.get("IsTruncated"):
                return
            markers = (page.get("NextKeyMarker"), page.get("NextUploadIdMarker"))
            if not markers[0] or markers == (params.get("KeyMarker"),
                                             params.get("UploadIdMarker")):
                raise StorageUnavailable(
                    "S3 ListMultipartUploads returned no usable next marker"
                )
            params["KeyMarker"] = markers[0]
            if markers[1]:
                params["UploadIdMarker"] = markers[1]
            else:
                params.pop("UploadIdMarker", None)

    async def _scan_records(
        self,
    ) -> AsyncIterator[tuple[dict[str, Any], tuple[bytes, str] | None]]:
        """Every session record's listing entry and (body, ETag), None if it
        was deleted meanwhile; in listing order, ``_READ_CONCURRENCY`` GETs in
        flight, so memory stays at one listing page plus that many records."""
        window: deque[tuple[dict[str, Any], asyncio.Task[tuple[bytes, str] | None]]] = deque()
        try:
            async with aclosing(self._list_objects(f"{self._reserved}sessions/")) as items:
                async for item in items:
                    window.append((item, asyncio.create_task(self._get_bytes(str(item["Key"])))))
                    if len(window) >= _READ_CONCURRENCY:
                        first, task = window.popleft()
                        yield first, await task
            while window:
                first, task = window.popleft()
                yield first, await task
        finally:
            # The consumer stopped early, or a read or the listing failed.
            for _, task in window:
                task.cancel()
            if window:
                await asyncio.gather(*(task for _, task in window), return_exceptions=True)

    async def _ensure_bucket(self) -> None:
        try:
            await self._call("HeadBucket", {"404", "NoSuchBucket", "NotFound"},
                             Bucket=self._bucket)
            return
        except _S3Refusal:
            pass
        params: dict[str, Any] = {"Bucket": self._bucket}
        if self._s3.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self._s3.region}
        try:
            await self._call("CreateBucket", {"BucketAlreadyOwnedByYou"}, **params)
            log.info("created bucket %s", self._bucket)
        except _S3Refusal:
            pass  # created by another instance meanwhile

    # -- S3 calls and error translation -------------------------------------

    @asynccontextmanager
    async def _s3_errors(
        self, operation: str, handled: Collection[str] = ()
    ) -> AsyncIterator[None]:
        """Turn botocore/aiohttp failures into ``StorageUnavailable`` (or
        ``_S3Refusal`` for the error codes the caller handles itself)."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "")) or "Unknown"
            message = str(error.get("Message", "")) or "no message"
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in handled or str(status) in handled:
                raise _S3Refusal(operation, code if code in handled else str(status),
                                 message) from None
            log.warning("S3 %s failed: %s (HTTP %s): %s", operation, code, status, message)
            raise StorageUnavailable(f"S3 {operation} failed: {code}: {message}") from None
        except _TRANSPORT_ERRORS as exc:
            log.warning("S3 %s failed: %s: %s", operation, type(exc).__name__, exc)
            # The text of these errors holds the endpoint URL and key: logs only.
            raise StorageUnavailable(
                f"S3 {operation} failed: {_transport_reason(exc)}"
            ) from None

    async def _call(
        self, operation: str, handled: Collection[str] = (), /, **params: Any
    ) -> dict[str, Any]:
        method = getattr(self._client, _CAMEL_WORD.sub("_", operation).lower())
        async with self._s3_errors(operation, handled):
            result: dict[str, Any] = await method(**params)
        return result

    async def _get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """An object's body and ETag; None when it does not exist."""
        try:
            async with self._s3_errors("GetObject", _MISSING_KEY_CODES):
                result = await self._client.get_object(Bucket=self._bucket, Key=key)
                async with result["Body"] as stream:
                    data: bytes = await stream.read()
        except _S3Refusal:
            return None
        return data, str(result["ETag"])


async def _close_quietly(chunks: AsyncIterable[bytes]) -> None:
    """Close a chunk stream the write stops reading early (if it can be closed)."""
    closer = getattr(chunks, "aclose", None)
    if closer is None:
        return
    try:
        await closer()
    except Exception:
        log.debug("closing the chunk stream failed", exc_info=True)


async def _bounded_map(
    fn: Callable[[_T], Awaitable[_R]], items: Iterable[_T], limit: int = _READ_CONCURRENCY
) -> list[_R]:
    """``[await fn(item) for item in items]`` with ``limit`` calls at a time."""
    semaphore = asyncio.Semaphore(limit)

    async def one(item: _T) -> _R:
        async with semaphore:
            return await fn(item)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(item)) for item in items]
    except ExceptionGroup as failed:
        # Callers handle the store's own errors, not groups of them.
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _parse_listed(key: str, raw: bytes) -> _Record | None:
    """A listed session record; None (logged) when it is damaged."""
    try:
        return _Record.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("skipping damaged session record %s: %r", key, exc)
        return None


def _timestamp(value: object) -> float:
    """Unix time of an S3 date; infinity (never old) when there is none."""
    if isinstance(value, datetime):
        return value.timestamp()
    return float("inf")


def _translate(exc: BaseException, name: str) -> UploadError:
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, _S3Refusal) and exc.code in _NO_UPLOAD_CODES:
        return UploadNotFound(f"the multipart upload of {name!r} no longer exists")
    if isinstance(exc, _S3Refusal):
        return StorageUnavailable(f"S3 {exc.operation} failed: {exc.code}: {exc.message}")
    log.error("unexpected failure writing %r: %r", name, exc)
    return StorageUnavailable(f"storing {name!r} failed: {type(exc).__name__}")


def _transport_reason(exc: BaseException) -> str:
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError
                  | aiohttp.ClientConnectorError):
        return "cannot connect to S3"
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return "S3 did not answer in time"
    if isinstance(exc, ConnectionClosedError | aiohttp.ServerDisconnectedError
                  | aiohttp.ClientPayloadError | ConnectionError):
        return "the connection to S3 was cut"
    return type(exc).__name__


def _object_metadata(metadata: Mapping[str, str], session_id: str) -> dict[str, str]:
    """User metadata as S3 can carry it in headers: keys must be header tokens;
    values outside printable ASCII are RFC 2047 encoded (as AWS recommends)."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not _HEADER_TOKEN.fullmatch(key):
            raise BadRequest(f"metadata key {key!r} cannot be stored as S3 object metadata")
        if value.isascii() and value.isprintable() and value == value.strip():
            out[key.lower()] = value
        else:
            encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
            out[key.lower()] = f"=?UTF-8?B?{encoded}?="
    out[_SESSION_META] = session_id
    return out
