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
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Collection,
    Mapping,
)
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import google_crc32c
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from app.config import StorageConfig
from app.core import rules
from app.core.digests import crc32c_b64, crc32c_extend
from app.core.model import CompletedObject, PendingCallback, UploadInfo, oldest_first
from app.core.protocol import MAX_PARTS, RESERVED_PREFIX
from app.errors import (
    BadRequest,
    OffsetMismatch,
    StorageUnavailable,
    TooLarge,
    TotalMismatch,
    UploadError,
    UploadNotFound,
)
from app.ops.metrics import instrument_s3_client
from app.stores.s3.errors import (
    _CONFLICT_CODES,
    _MISSING_KEY_CODES,
    _NO_UPLOAD_CODES,
    _TRANSPORT_ERRORS,
    _S3Refusal,
    _translate,
    _transport_reason,
)
from app.stores.s3.orphans import _READ_CONCURRENCY, S3OrphanSweeper
from app.stores.s3.records import (
    _SESSION_META,
    _parse_listed,
    _Record,
    _Segment,
    _StagedCache,
)

if TYPE_CHECKING:
    from app.ops.metrics import Metrics

log = logging.getLogger("app.stores.s3")

#: Past this many staged segments in one part, a write folds them into one
#: object, so a client sending tiny chunks cannot grow the record without bound.
_MAX_STAGED_SEGMENTS = 32
#: The staged-bytes cache holds this many (configured) parts' worth in total.
_CACHE_PARTS = 4
_DELETE_BATCH = 1000
_HEADER_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_CAMEL_WORD = re.compile(r"(?<!^)(?=[A-Z])")


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


class S3Store(S3OrphanSweeper):
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
        target: str | None = None,
    ) -> UploadInfo:
        part_size = rules.part_size_for_new(total, self._config.part_size)
        session_id = uuid.uuid4().hex
        object_metadata = _object_metadata(metadata, session_id)
        old = await self._read_record(name)
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._object_key(name if target is None else target),
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
            target=target,
        )
        try:
            try:
                etag = await self._put_record(record, if_match=None if old is None else old[1])
            except UploadNotFound:
                # The old session was cancelled meanwhile: nothing left to replace.
                old = None
                etag = await self._put_record(record, if_match=None)
        except UploadError:
            await self._abort_quietly(record.object_name, record.upload_id)
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
        settled = rules.check_write(record.to_info(etag), info, total)
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
        if rules.check_finish(record.to_info(etag), info):
            return record.to_info(etag)
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

    async def cancel(self, name: str, *, session_id: str | None = None) -> None:
        record, etag = await self._load_record(name)
        rules.check_cancel(record.to_info(etag), session_id)
        if record.completed is None:
            await self._discard_session_data(record, quiet=False)
        # A completed upload only loses its record: the object is the client's.
        await self._call("DeleteObject", Bucket=self._bucket, Key=self._record_key(name))

    def list_unfinished(self) -> AsyncIterator[UploadInfo]:
        return self._list_sessions(completed=False)

    def list_completed(self) -> AsyncIterator[UploadInfo]:
        return self._list_sessions(completed=True)

    async def _list_sessions(self, *, completed: bool) -> AsyncIterator[UploadInfo]:
        async with aclosing(self._scan_records()) as records:
            async for item, loaded in records:
                if loaded is None:
                    continue  # finished/cancelled while listing
                record = _parse_listed(str(item["Key"]), loaded[0])
                if record is not None and (record.completed is not None) == completed:
                    yield record.to_info(loaded[1])

    # -- HealthCheck --------------------------------------------------------

    async def check_health(self) -> None:
        key = f"{self._reserved}health/{self._instance}"
        await self._call("PutObject", Bucket=self._bucket, Key=key, Body=b"ok")
        await self._call("DeleteObject", Bucket=self._bucket, Key=key)

    # -- CallbackOutbox -----------------------------------------------------

    async def save_pending(self, callback_id: str, payload: bytes) -> None:
        pending = PendingCallback(callback_id, bytes(payload), time.time())
        await self._call(
            "PutObject", Bucket=self._bucket, Key=self._callback_key(callback_id),
            Body=pending.to_json(), ContentType="application/json",
        )

    async def delete_pending(self, callback_id: str) -> None:
        await self._call("DeleteObject", Bucket=self._bucket, Key=self._callback_key(callback_id))

    async def list_pending(self) -> list[tuple[str, bytes]]:
        found: list[PendingCallback] = []
        async for key in self._list_keys(f"{self._reserved}callbacks/"):
            loaded = await self._get_bytes(key)
            if loaded is None:
                continue  # delivered while listing
            try:
                found.append(PendingCallback.from_json(loaded[0]))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping damaged callback record %s: %r", key, exc)
        return oldest_first(found)

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
            "Key": self._object_key(record.object_name),
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
        key = self._object_key(record.object_name)
        if total == 0:
            # S3 cannot complete an MPU without parts.
            put = await self._call(
                "PutObject", Bucket=self._bucket, Key=key, Body=b"",
                ContentType=record.content_type,
                Metadata=_object_metadata(record.metadata, record.session_id),
            )
            await self._abort_quietly(record.object_name, record.upload_id)
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
            key=self._object_key(record.object_name),
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
                Key=self._object_key(record.object_name),
            )
        except _S3Refusal:
            head = None
        if head is None or head.get("Metadata", {}).get(_SESSION_META) != record.session_id:
            raise UploadNotFound(f"the multipart upload of {record.name!r} no longer exists")
        return self._completed(record, str(head["ETag"]), int(head["ContentLength"]))

    async def _list_parts(self, record: _Record) -> dict[int, dict[str, Any]]:
        return await self._parts(self._object_key(record.object_name), record.upload_id)

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
                Key=self._object_key(record.object_name), UploadId=record.upload_id,
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
