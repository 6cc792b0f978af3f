"""S3 store: one multipart upload (MPU) per upload, state kept in the bucket.

Layout under the configured ``prefix``::

    {prefix}{name}                                    the finished object
    {prefix}.uploads/sessions/{sha256(name)}.json     session record (JSON)
    {prefix}.uploads/staged/{session_id}/{start:020d}-{token}
                                                      tail bytes not yet in a part
    {prefix}.uploads/callbacks/{id}                   pending completion callbacks

Part ``n`` (1-based) holds bytes ``[(n-1)*P, n*P)``; every part but the last is
exactly ``P``, kept in the record. ``P`` is the configured part size (grown
for a large total) until the first write: a first write at byte 0 that
declares its length settles ``P`` on that length when S3 takes it as a part
(``rules.aligned_part_size``, capped by ``storage.max_part_size``), so a client
sending chunks of that size has each one uploaded as exactly one part with
nothing staged. Once bytes are stored ``P`` never changes (R2 wants equal
parts); chunks that do not align are staged as below. Bytes past the last full part
are *staged*: each write's remainder becomes its own small object keyed by its
start offset, and when a part fills, the staged segments plus the new bytes are
uploaded as that part. The key also carries a token unique to the write, and
the record names the exact segments that are valid: a writer that loses the
race for the record can never overwrite staged bytes the winner recorded, and
orphans of a crashed write are never read (they are swept on finish/cancel).

The record's ETag is the ``UploadInfo.version``; every record update is a
conditional PUT (``IfMatch``/``IfNoneMatch``), so two processes can never both
advance one upload. Nothing here ever touches local disk.

The record also names every part it accounts for (ETag, CRC32C), and
completion assembles exactly those, never what ListParts holds. UploadPart
takes no condition, so a writer that lost the race for the record can still
overwrite a part late, even an acknowledged one. Completion compares S3's
ETags with the record's first (and CompleteMultipartUpload compares them
again, answering ``InvalidPart``): a differing staged tail is uploaded again;
a differing full part makes ``finish`` roll the record back to that part's
start and return the upload unfinished, so the client is asked for those bytes
again (308 with the lower ``Range``). That was chosen over refusing to
complete: the bytes are usually still at the client (files, buffered chunks),
refusing would throw away an upload that can be repaired, and the state after
the rollback is exactly what S3 holds that the record can vouch for. A client
that cannot go back (ours, when it had an acknowledgement beyond that point)
reports the loss clearly instead of getting another writer's bytes.

``S3Store`` checks each request against ``app.core.rules`` and composes
collaborators that each own one concern:

* ``client.S3Client``: every S3 call, error translation (``errors.py``) to
  ``app.errors``, whole-body reads, paged listings, batched deletes; and the
  botocore hooks that report calls to a ``CallObserver``.
* ``records.Records`` / ``records.Layout``: the session record, where
  everything lives, conditional record reads and writes, record scans.
* ``staged.StagedData``: staged tail objects and the cache of them.
* ``writer.Writer``: the write loop, parts in flight, staging of the tail,
  honest cancellation; ``parts.py`` its bookkeeping, the UploadPart call
  (``PartBody``: a part sent as the pieces it arrived in, uncopied) and
  ``BufferGauge``, the count of part buffers held (taken from the app's
  ``MemoryBudget``, which bounds them across every upload).
* ``completion.Completion``: the MPU (and its staged tail) into the object.
* ``sweeper.S3OrphanSweeper``: crash leftovers, found and removed (the
  store's ``OrphanSweeper`` capability delegates to it).
* ``concat.Joiner``: finished objects read back (ranged GETs) and joined
  with ``UploadPartCopy`` (the ``ObjectReader`` and ``Concatenation``
  capabilities delegate to it).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import replace
from typing import Any

from app.config import StorageConfig
from app.core import rules
from app.core.budget import MemoryBudget
from app.core.leases import Timing
from app.core.model import CompletedObject, PendingCallback, UploadInfo, oldest_first
from app.errors import BadRequest, InvalidName, OffsetMismatch, UploadError, UploadNotFound
from app.stores.base import CallObserver, Orphan
from app.stores.s3.client import S3Client
from app.stores.s3.completion import (
    Completion,
    PartOverwritten,
    from_header_value,
    object_metadata,
)
from app.stores.s3.concat import Joiner
from app.stores.s3.errors import S3Refusal
from app.stores.s3.leases import Leases, check_conditional_writes, instance_id
from app.stores.s3.markers import Markers
from app.stores.s3.parts import BufferGauge
from app.stores.s3.records import OWNER_META, Layout, Record, Records
from app.stores.s3.staged import StagedData
from app.stores.s3.sweeper import S3OrphanSweeper
from app.stores.s3.writer import Writer

log = logging.getLogger("app.stores.s3")

#: The staged-bytes cache holds this many (configured) parts' worth in total.
_CACHE_PARTS = 4
#: S3's longest object key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024


class S3Store:
    """The ``Store`` contract on S3 multipart uploads (see ``app.stores.base``).

    Also a ``HealthCheck``, a ``CallbackOutbox``, an ``OrphanSweeper``,
    ``ReportsCalls``, an ``ObjectReader`` and a ``Concatenation``.
    """

    def __init__(self, config: StorageConfig, client: S3Client,
                 budget: MemoryBudget | None = None) -> None:
        """``budget``: the app's memory budget, which part buffers are taken
        from; without one the store gets its own, as configured."""
        self._config = config
        self._client = client
        self._layout = Layout(config.s3.prefix)
        self._checksums = config.s3.checksum_mode == "when_supported"
        self._instance = instance_id()
        self._gauge = BufferGauge()
        self.budget = budget if budget is not None else MemoryBudget(
            config.memory_budget, wait=config.budget_wait)
        conditional = config.s3.conditional_writes
        self.records = Records(client, self._layout, conditional=conditional)
        self.leases = Leases(client, self._layout, self.records, self._instance,
                             Timing(config.lease_ttl), takeover_timeout=config.takeover_timeout,
                             enabled=conditional)
        self._staged = StagedData(client, self._layout, checksums=self._checksums,
                                  cache_budget=_CACHE_PARTS * config.part_size)
        self._writer = Writer(client, self._layout, self.records, self._staged, self._gauge,
                              self.leases, budget=self.budget,
                              parts_in_flight=config.parts_in_flight)
        self._completion = Completion(client, self._layout, self._staged, self._gauge,
                                      budget=self.budget)
        self.markers = Markers(client, self._layout)
        self.sweeper = S3OrphanSweeper(client, self._layout, self.records, self._staged,
                                       self.markers)
        self._joiner = Joiner(client, self.records, self._layout)

    @classmethod
    async def open(cls, config: StorageConfig, budget: MemoryBudget | None = None, *,
                   check_writes: bool = True) -> S3Store:
        """``check_writes``: refuse a bucket that ignores conditional writes
        (unless they are configured off); an instance serving uploads needs
        them, a tool that only sweeps does not."""
        client = await S3Client.connect(config)
        try:
            if config.s3.create_bucket:
                await client.ensure_bucket(config.s3.region)
            if check_writes and config.s3.conditional_writes:
                await check_conditional_writes(client, Layout(config.s3.prefix))
            elif check_writes:
                log.warning("storage.s3.conditional_writes is off: run a single instance, or "
                            "promise sticky sessions; several instances writing one upload "
                            "can then corrupt it (docs/scaling.md)")
        except BaseException:
            await client.close()
            raise
        return cls(config, client, budget)

    async def close(self) -> None:
        await self._client.close()

    @property
    def client(self) -> S3Client:
        return self._client

    @property
    def max_name_bytes(self) -> int:
        """Longest object name (UTF-8 bytes) this store can keep: S3's 1,024-byte
        keys less the configured prefix."""
        return MAX_KEY_BYTES - len(self._layout.prefix.encode("utf-8"))

    def _check_name_fits(self, name: str) -> None:
        # Checked before anything is created: S3 would refuse the key with
        # KeyTooLongError only at CreateMultipartUpload, after the name passed
        # the protocol's own 1,024-byte limit.
        if len(name.encode("utf-8", "surrogatepass")) > self.max_name_bytes:
            raise InvalidName(
                f"the upload name is longer than {self.max_name_bytes} UTF-8 bytes, the most "
                f"S3's 1024-byte keys leave after this service's key prefix "
                f"({self._layout.prefix!r})"
            )

    # -- observation ----------------------------------------------------------

    def observe_calls(self, observer: CallObserver) -> None:
        """``ReportsCalls``: tell ``observer`` about every S3 call of this store."""
        self._client.observe_calls(observer)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of part buffers this store holds right now (all uploads)."""
        return self._gauge.held

    @property
    def peak_buffered_bytes(self) -> int:
        """Highest ``buffered_bytes`` since the last ``reset_peak_buffered``."""
        return self._gauge.peak

    def reset_peak_buffered(self) -> None:
        self._gauge.reset_peak()

    @property
    def cached_staged_bytes(self) -> int:
        return self._staged.cached_bytes

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
        self._check_name_fits(name if target is None else target)
        part_size = rules.part_size_for_new(total, self._config.part_size)
        session_id = uuid.uuid4().hex
        params: dict[str, Any] = {
            "Key": self._layout.object_key(name if target is None else target),
            "ContentType": content_type,
            "Metadata": object_metadata(metadata, session_id, owner),
        }
        old = await self.records.read(name)
        upload_id = await self.begin_multipart(session_id, params)
        now = time.time()
        record = Record(
            name=name, session_id=session_id, upload_id=upload_id, offset=0,
            total=total, part_size=part_size, crc32c=0, content_type=content_type,
            metadata=dict(metadata), owner=owner, created_at=now, updated_at=now,
            checksum_algorithm="CRC32C" if self._checksums else None, target=target,
        )
        try:
            try:
                etag = await self.records.put(record, if_match=None if old is None else old[1])
            except UploadNotFound:
                # The old session was cancelled meanwhile: nothing left to replace.
                old = None
                etag = await self.records.put(record, if_match=None)
        except UploadError:
            await self._abort_quietly(record)
            raise
        if old is not None and old[0].completed is None:
            # The new record is in place first: a crash here leaves garbage to
            # sweep, never a record pointing at an aborted upload.
            await self._discard_session_data(old[0], quiet=True)
        log.debug("created S3 upload for %r (session %s)", name, session_id)
        return record.to_info(etag)

    async def begin_multipart(self, session_id: str, params: dict[str, Any]) -> str:
        """The first half of ``create``: the marker, then the multipart upload
        (``params`` for CreateMultipartUpload); its upload id. The marker comes
        first so that an upload whose record never got written (a crash here)
        is still provably this store's, and swept."""
        key = str(params["Key"])
        await self.markers.write(key, session_id)
        if self._checksums:
            params = {**params, "ChecksumAlgorithm": "CRC32C"}
        try:
            created = await self._client.call("CreateMultipartUpload", {"MetadataTooLarge"},
                                              **params)
        except BaseException as exc:
            await self.markers.delete(key, session_id)
            if isinstance(exc, S3Refusal):
                raise BadRequest(
                    f"the upload's metadata is too large for S3: {exc.message}"
                ) from None
            raise
        return str(created["UploadId"])

    async def get(self, name: str) -> UploadInfo:
        loaded = self.leases.take_fresh(name)
        record, etag = loaded if loaded is not None else await self.records.load(name)
        return record.to_info(etag)

    async def write(
        self,
        info: UploadInfo,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
        expected_length: int | None = None,
    ) -> UploadInfo:
        if info.completed is not None:
            raise UploadNotFound(f"the upload {info.name!r} is already complete")
        # The record this process just read (the caller's ``get``) saves a
        # GET: every write that follows is conditional over it, and a part
        # upload starts only under the lease taken that way.
        record, etag = await self._trusted(info)
        settled = rules.check_write(record.to_info(etag), info, total)
        stored = record
        record = self._aligned(record, settled, expected_length)
        done = await self._writer.write(record, etag, settled, chunks)
        # A write that stored nothing did not record the part size it chose:
        # the upload is still as it was, and the next first write decides again.
        return stored.to_info(etag) if done.version == etag else done

    def _aligned(self, record: Record, total: int | None, expected_length: int | None) -> Record:
        """``record`` with the part size its first write settles on (parts that
        match the client's chunks, ``rules.aligned_part_size``); the record
        write that stores the first bytes persists it."""
        part_size = rules.aligned_part_size(
            record.part_size, offset=record.offset, length=expected_length, total=total,
            ceiling=self._config.max_upload_size, largest=self._config.max_part_size,
        )
        if part_size == record.part_size:
            return record
        log.debug("upload %r: part size %d settled from its first chunk", record.name, part_size)
        return replace(record, part_size=part_size)

    async def _trusted(self, info: UploadInfo) -> tuple[Record, str]:
        """The record ``info`` was read from, from this process's cache when
        it has that version: what follows is a conditional write over it."""
        known = self.records.known(info.name, info.version)
        if known is not None and info.version is not None:
            return known, info.version
        return await self.records.load(info.name)

    def writing(self, name: str, stop: Callable[[], None]) -> AbstractAsyncContextManager[None]:
        """``SharedWriting``: around a request that may write ``name``."""
        return self.leases.writing(name, stop)

    async def finish(
        self, info: UploadInfo, *, md5: bytes | None = None, notify: bool = False
    ) -> UploadInfo:
        if info.completed is not None:
            return info
        record, etag = await self._trusted(info)
        if rules.check_finish(record.to_info(etag), info):
            return record.to_info(etag)
        if notify and not record.notify_pending:
            # The intent first: CompleteMultipartUpload and the record write
            # after it are two steps, and a crash between them must not lose
            # the callback. An unfinished record carrying the intent is
            # finished by start-up and the cleanup job.
            record, etag = await self.leases.put(replace(record, notify_pending=True), etag)
        # Completion assembles the parts the record names: only under the
        # lease, checked again before each request that S3 cannot condition
        # (the tail's UploadPart, CompleteMultipartUpload), so no part it
        # names is being overwritten meanwhile.
        took = not self.leases.holds(info.name)

        async def fence() -> None:
            nonlocal record, etag
            record, etag = await self.leases.ensure(record, etag)

        try:
            await fence()
            async with self.leases.busy(info.name):
                completed = replace(await self._completion.complete(record, fence), md5=md5)
        except PartOverwritten as exc:
            return await self._roll_back(record, etag, exc.number)
        except BaseException:
            if took:
                # Taken for this completion alone (a probe that finishes, a
                # recovery): others need not wait for it to expire.
                await self.leases.release_quietly(info.name)
            raise
        done = replace(record, completed=completed, staged=(), tail_crc32c=0,
                       updated_at=completed.completed_at)
        try:
            done, etag = await self.leases.put(done, etag, release=True)
        except (OffsetMismatch, UploadNotFound):
            # Another process may have finished the same session first.
            again = await self.records.read(info.name)
            if again is not None and again[0].session_id == record.session_id \
                    and again[0].completed is not None:
                return again[0].to_info(again[1])
            raise
        await self._staged.discard_session(record.session_id, quiet=True)
        await self.markers.delete(self._layout.object_key(record.object_name), record.session_id)
        return done.to_info(etag)

    async def _roll_back(self, record: Record, etag: str, number: int) -> UploadInfo:
        """The record, rolled back to just before part ``number``, which S3 no
        longer holds as acknowledged: the client is asked for those bytes
        again (a 308 with the lower ``Range``) rather than given an object
        with another writer's bytes in it, or refused outright. Parts from
        ``number`` on are overwritten by the resend and checked again at the
        next completion."""
        assert record.parts is not None
        kept = record.parts[: number - 1]
        offset = (number - 1) * record.part_size
        # The intent to notify goes too: nothing completed, and start-up must
        # not try to finish an upload that now waits for the client's bytes.
        rolled = replace(record, offset=offset, crc32c=kept[-1].end_crc32c if kept else 0,
                         parts=kept, staged=(), tail_crc32c=0, updated_at=time.time(),
                         notify_pending=False)
        log.error("upload %r: part %d was overwritten by a writer that lost the session "
                  "record; rolled back from %d to %d bytes, the client must resend from there",
                  record.name, number, record.offset, offset)
        rolled, etag = await self.leases.put(rolled, etag, release=True)
        await self._staged.delete(record.session_id, record.staged)
        return rolled.to_info(etag)

    async def cancel(self, name: str, *, session_id: str | None = None) -> None:
        record, etag = await self.records.load(name)
        rules.check_cancel(record.to_info(etag), session_id)
        if record.completed is None:
            await self._discard_session_data(record, quiet=False)
        # A completed upload only loses its record: the object is the client's.
        await self.records.delete(name)

    def list_unfinished(self) -> AsyncIterator[UploadInfo]:
        return self._list_sessions(completed=False)

    def list_completed(self) -> AsyncIterator[UploadInfo]:
        return self._list_sessions(completed=True)

    async def _list_sessions(self, *, completed: bool) -> AsyncIterator[UploadInfo]:
        async with aclosing(self.records.parsed()) as records:
            async for _, _, record, etag in records:
                if record is not None and (record.completed is not None) == completed:
                    yield record.to_info(etag)

    async def _discard_session_data(self, record: Record, *, quiet: bool) -> None:
        key = self._layout.object_key(record.object_name)
        try:
            await self._client.abort_upload(key, record.upload_id)
        except UploadError:
            if not quiet:
                raise
        await self._staged.discard_session(record.session_id, quiet=quiet)
        await self.markers.delete(key, record.session_id)

    async def _abort_quietly(self, record: Record) -> None:
        key = self._layout.object_key(record.object_name)
        try:
            await self._client.abort_upload(key, record.upload_id)
        except UploadError:
            return  # logged by the client; the marked MPU only costs storage until swept
        await self.markers.delete(key, record.session_id)

    # -- ObjectReader, Concatenation ----------------------------------------

    def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        return self._joiner.read_object(done)

    def can_join(self, sources: Sequence[CompletedObject]) -> bool:
        return self._joiner.can_join(sources)

    async def join(
        self, info: UploadInfo, sources: Sequence[CompletedObject], *, notify: bool = False
    ) -> UploadInfo:
        done = await self._joiner.join(info, sources, notify=notify)
        await self.markers.delete(self._layout.object_key(done.object_name), done.session_id)
        return done

    # -- HealthCheck --------------------------------------------------------

    async def check_health(self) -> None:
        key = f"{self._layout.reserved}health/{self._instance}"
        await self._client.call("PutObject", Key=key, Body=b"ok")
        await self._client.call("DeleteObject", Key=key)

    # -- ObjectOwners ---------------------------------------------------------

    async def owner_of(self, name: str) -> str | None:
        head = await self._client.head(self._layout.object_key(name))
        if head is None:
            return None
        owner = head.get("Metadata", {}).get(OWNER_META)
        return None if owner is None else from_header_value(str(owner))

    # -- ObjectLookup ----------------------------------------------------------

    async def object_exists(self, name: str) -> bool:
        return await self._client.head(self._layout.object_key(name)) is not None

    # -- PendingNotices -------------------------------------------------------

    async def clear_notice(self, name: str, session_id: str) -> None:
        loaded = await self.records.read(name)
        if loaded is None:
            return
        record, etag = loaded
        if record.session_id != session_id or not record.notify_pending:
            return
        try:
            await self.records.put(replace(record, notify_pending=False), if_match=etag)
        except (OffsetMismatch, UploadNotFound):
            pass  # replaced, forgotten or cleared by another process meanwhile

    # -- CallbackOutbox -----------------------------------------------------

    async def save_pending(self, callback_id: str, payload: bytes) -> None:
        pending = PendingCallback(callback_id, bytes(payload), time.time())
        await self._client.call("PutObject", Key=self._layout.callback_key(callback_id),
                                Body=pending.to_json(), ContentType="application/json")

    async def delete_pending(self, callback_id: str) -> None:
        await self._client.call("DeleteObject", Key=self._layout.callback_key(callback_id))

    async def list_pending(self) -> list[tuple[str, bytes]]:
        found: list[PendingCallback] = []
        async for key in self._client.list_keys(self._layout.callbacks_root):
            loaded = await self._client.get_bytes(key)
            if loaded is None:
                continue  # delivered while listing
            try:
                found.append(PendingCallback.from_json(loaded[0]))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping damaged callback record %s: %r", key, exc)
        return oldest_first(found)

    # -- OrphanSweeper ----------------------------------------------------------

    async def find_orphans(self, older_than: float, now: float) -> list[Orphan]:
        return await self.sweeper.find_orphans(older_than, now)

    async def remove_orphan(self, orphan: Orphan) -> int:
        return await self.sweeper.remove_orphan(orphan)
