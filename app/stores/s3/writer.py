"""The S3 write path: one ``write`` streams chunks into full parts (uploaded
``parts_in_flight`` at a time while the next one fills), records every
contiguous run of landed parts, and stages what is left short of a part.

Cancellation is honest: ``Writer.write`` re-raises ``CancelledError`` once the
upload is consistent again. Record and staged writes already sent are awaited
to their end (``settled``), part uploads in flight are stopped, staged objects
the record no longer names are deleted, and no part buffer stays held. What the
record says then counts; nothing else does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import replace

from app.core.budget import MemoryBudget
from app.core.digests import crc32c_extend
from app.core.protocol import MAX_PARTS
from app.errors import Overloaded, TooLarge, TotalMismatch, UploadError
from app.stores.base import UploadInfo
from app.stores.s3.client import S3Client
from app.stores.s3.errors import S3Refusal, translate
from app.stores.s3.leases import Leases
from app.stores.s3.parts import (
    BufferGauge,
    Fill,
    WriteState,
    bare_etag,
    close_quietly,
    upload_part,
)
from app.stores.s3.records import Layout, Part, Record, Records
from app.stores.s3.staged import StagedData
from app.stores.settle import settled

log = logging.getLogger("app.stores.s3")

#: A write that does not complete the upload keeps a remainder past the last
#: full part only in whole granules (from the part's start) once the upload
#: has used up its budget of small writes. Every staged byte is then written to
#: S3 twice at most (staged, then in its part), never re-uploaded by folding
#: segments together, and a record names at most the budget plus
#: part / granule + 1 segments. Google asks for 256 KiB multiples too. With an
#: unknown total the end of a stream can be the end of the object only for a
#: plain PUT, which is a single write of a new upload: the budget is never
#: spent by then.
GRANULE = 256 * 1024
#: Granules per part at most: bigger parts (objects over 160 GiB) get bigger
#: granules, so the record stays small.
MAX_GRANULES = 64
#: Writes of an upload that stage a remainder shorter than ``GRANULE`` in full.
SMALL_WRITE_BUDGET = 64
#: Pieces of a part shorter than this are gathered into one ``bytearray``
#: rather than kept one by one: a client trickling a byte per read must not
#: make a part cost an object per byte.
SMALL_PIECE = 64 * 1024
#: Bound on the clean-up after a cancellation: a cancelled (often timed-out)
#: write must not linger; what it leaves is garbage the orphan sweep finds.
_CANCEL_CLEANUP_SECONDS = 10.0

def granule_of(part_size: int) -> int:
    """The granule of non-final writes for parts of ``part_size``."""
    return max(GRANULE, -(-part_size // (MAX_GRANULES * GRANULE)) * GRANULE)


class Writer:
    """Appends a stream of bytes to an upload (``Store.write`` minus its checks)."""

    def __init__(self, client: S3Client, layout: Layout, records: Records, staged: StagedData,
                 gauge: BufferGauge, leases: Leases, *, budget: MemoryBudget,
                 parts_in_flight: int) -> None:
        self._client = client
        self._layout = layout
        self._records = records
        self._leases = leases
        self._staged = staged
        self._gauge = gauge
        self._budget = budget
        self._parts_in_flight = parts_in_flight

    async def write(self, record: Record, etag: str, total: int | None,
                    chunks: AsyncIterable[bytes]) -> UploadInfo:
        """Append ``chunks`` to the upload ``record`` (at ``etag``) describes.
        The record may be this process's cached copy: the lease taken before
        the first part upload is a conditional write over it."""
        first_part = record.offset // record.part_size + 1
        state = WriteState(
            record=record, etag=etag, total=total, prefix=record.staged,
            first_part=first_part, committed_part=first_part - 1,
            semaphore=asyncio.Semaphore(self._parts_in_flight), gauge=self._gauge,
            budget=self._budget,
        )
        self._leases.begin_write(record, etag)
        try:
            return await self._write(state, chunks)
        except asyncio.CancelledError:
            self._leases.end_write(record.name)
            await self._stop_parts(state)
            await self._clean_after_cancel(state)
            raise
        finally:
            self._leases.end_write(record.name)
            await self._stop_parts(state)
            if state.buffered:
                state.release(state.buffered)

    async def _write(self, state: WriteState, chunks: AsyncIterable[bytes]) -> UploadInfo:
        fill = self._start_fill(state)
        stream = aiter(chunks)
        overflow, stream_error = await self._read_body(state, fill, stream)
        state.ended = True
        self._leases.end_write(state.record.name)
        if stream_error is None and (overflow is not None or state.failure is not None):
            await close_quietly(stream)
        # A cancellation that arrived while waiting for the body is raised
        # after what arrived is kept, whatever else went wrong.
        cancelled = stream_error if isinstance(stream_error, asyncio.CancelledError) else None
        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)
        if state.failure is not None:
            await self._end_failed_write(state)
            if cancelled is not None:
                raise cancelled
            raise translate(state.failure, state.record.name) from None
        try:
            await self._persist_tail(state, fill)
        except UploadError:
            await self._drop_consumed(state)
            if cancelled is not None:
                raise cancelled from None
            raise
        await self._drop_consumed(state)
        if stream_error is not None:
            raise stream_error
        if overflow is not None:
            raise overflow
        return state.record.to_info(state.etag)

    @staticmethod
    def _start_fill(state: WriteState) -> Fill:
        record = state.record
        size = record.part_size
        limit = state.total if state.total is not None else size * MAX_PARTS
        start = (state.first_part - 1) * size
        prefix_len = record.offset - start
        return Fill(
            size=size, limit=limit, number=state.first_part, start=start,
            length=min(size, limit - start), pos=prefix_len, new_from=prefix_len,
            prefix_len=prefix_len, part_crc=record.tail_crc32c if prefix_len else 0,
            offset=record.offset, crc=record.crc32c,
        )

    async def _read_body(
        self, state: WriteState, fill: Fill, stream: AsyncIterator[bytes]
    ) -> tuple[UploadError | None, BaseException | None]:
        """Read chunks into parts until the stream ends, overflows, a part
        fails or no buffer came in time; (overflow or ``Overloaded``, stream
        error) tell why it stopped."""
        while state.failure is None:
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                break
            except BaseException as exc:
                # The client went away mid-body, or the caller was cancelled while
                # waiting for it: keep what arrived, then re-raise. (A cancellation
                # that lands in one of our own awaits stops the write instead.)
                return None, exc
            if not chunk:
                continue
            self._leases.note_flow(state.record.name)
            data = chunk if isinstance(chunk, bytes) else bytes(chunk)
            overflow = None
            if len(data) > fill.limit - fill.offset:
                data = data[: fill.limit - fill.offset]
                overflow = self._overflow(state, fill)
            if not await self._take(state, fill, data) or overflow is not None:
                return overflow, None
            if state.overloaded is not None:
                return state.overloaded, None
        return None, None

    @staticmethod
    def _overflow(state: WriteState, fill: Fill) -> UploadError:
        if state.total is not None:
            return TotalMismatch(
                f"more bytes than the declared total of {fill.limit} for {state.record.name!r}"
            )
        return TooLarge(
            f"an upload of unknown size can hold at most {MAX_PARTS} parts "
            f"of {fill.size} bytes ({fill.limit} bytes)"
        )

    async def _take(self, state: WriteState, fill: Fill, data: bytes) -> bool:
        """Add ``data`` to parts, launching each one that fills; False when
        a part failed and the rest can never become durable."""
        i = 0
        while i < len(data):
            if fill.pieces is None:
                fill.pieces = []
                await self._reserve_part(state, fill, len(data) - i)
            n = min(len(data) - i, fill.length - fill.pos)
            # Only a chunk that straddles a part boundary is sliced (copied).
            piece = data if n == len(data) else data[i : i + n]
            fill.new_crc = crc32c_extend(fill.new_crc, piece)
            if n >= SMALL_PIECE:
                fill.pieces.append(piece)
            elif fill.pieces and isinstance(fill.pieces[-1], bytearray) \
                    and len(fill.pieces[-1]) < SMALL_PIECE:
                fill.pieces[-1] += piece
            else:
                fill.pieces.append(bytearray(piece))
            fill.pos += n
            fill.offset += n
            i += n
            if fill.pos == fill.length:
                if not await self._launch_part(state, fill):
                    return False
                fill.next_part(state.boundaries[fill.number][1])
        return True

    @staticmethod
    async def _reserve_part(state: WriteState, fill: Fill, in_hand: int) -> None:
        """Budget for the part about to fill: waiting for it stops this write
        reading its client. If none came in time, only the ``in_hand`` bytes
        already read are counted (they are in memory anyway), so that they
        are staged, not lost, before the write ends."""
        if state.overloaded is None:
            try:
                await state.reserve(fill.length)
                fill.reserved = fill.length
                return
            except Overloaded as exc:
                state.overloaded = exc
        fill.reserved = min(in_hand, fill.length - fill.pos)
        state.hold(fill.reserved)

    async def _launch_part(self, state: WriteState, fill: Fill) -> bool:
        """Start uploading the full part; False (nothing started) after a failure."""
        assert fill.pieces is not None
        # Waiting here while holding the full buffer is what bounds memory to
        # (parts_in_flight + 1) parts per write.
        await state.semaphore.acquire()
        if state.failure is not None:
            # Bytes past a failed part can never become durable in this write.
            state.semaphore.release()
            return False
        state.boundaries[fill.number] = (fill.offset, fill.crc_now())
        state.last_launched = fill.number
        part_crc = fill.part_crc_now() if state.record.checksum_algorithm else 0
        task = asyncio.create_task(
            self._part_task(state, fill.number, fill.pieces, fill.reserved, fill.prefix_len,
                            part_crc)
        )
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
        return True

    async def _part_task(
        self, state: WriteState, number: int, pieces: list[bytes | bytearray], size: int,
        prefix_len: int, part_crc: int,
    ) -> None:
        body: list[bytes | bytearray] = []
        try:
            head = await self._staged.read_all(state.record, state.prefix) if prefix_len else []
            body = [*head, *pieces]
            # UploadPart takes no condition: it is sent only under this
            # process's lease with its margin left (taken or renewed here if
            # need be, over the record the write began from), so no other
            # writer can be using the part number.
            async with state.lock:
                state.record, state.etag = await self._leases.ensure(state.record, state.etag)
            async with self._leases.busy(state.record.name):
                result = await upload_part(self._client, self._layout, state.record, number, body,
                                           part_crc)
            # What this write uploaded is what the record will name: completion
            # assembles exactly these ETags, never whatever S3 lists later.
            state.landed[number] = Part(bare_etag(result["ETag"]), part_crc,
                                        state.boundaries[number][1])
            state.done.add(number)
        except Exception as exc:
            state.fail(exc)
        finally:
            # Not held while the record is committed below.
            body.clear()
            pieces.clear()
            state.release(size)
            state.semaphore.release()
        # The last part of a body that has ended is recorded by the final
        # record write, with the tail and the lease's release: one write less.
        if number in state.done and not (state.ended and number == state.last_launched):
            try:
                await self._commit_parts(state)
            except Exception as exc:
                state.fail(exc)

    @staticmethod
    def _advanced(state: WriteState) -> tuple[Record, int] | None:
        """The record advanced over the contiguous run of finished parts past
        the committed ones, and the last of them; None if there is none."""
        last = state.committed_part
        while last + 1 in state.done:
            last += 1
        if last == state.committed_part:
            return None
        end, end_crc = state.boundaries[last]
        parts = state.record.parts
        if parts is not None:
            parts = (*parts, *(state.landed[n] for n in range(state.committed_part + 1, last + 1)))
        record = replace(state.record, offset=end, crc32c=end_crc, total=state.total,
                         staged=(), tail_crc32c=0, updated_at=time.time(), parts=parts)
        return record, last

    async def _commit_parts(self, state: WriteState, *, release: bool = False) -> None:
        """Advance the record over the contiguous run of finished parts, so a
        crash mid-stream keeps everything up to the last such part."""
        async with state.lock:
            advanced = self._advanced(state)
            if advanced is None:
                if release and self._leases.holds(state.record.name):
                    state.record, state.etag = await settled(
                        self._leases.put(state.record, state.etag, release=True))
                return
            record, last = advanced
            state.record, state.etag = await settled(
                self._leases.put(record, state.etag, release=release))
            state.committed_part = last

    async def _persist_tail(self, state: WriteState, fill: Fill) -> None:
        """Stage the bytes past the last full part and record the new state,
        the parts that landed since the body ended and the lease's release
        (kept when the upload is full: completion needs it) in one write."""
        self._leases.check_fenced(state.record.name)
        advanced = self._advanced(state)
        base = state.record if advanced is None else advanced[0]
        staged, tail_crc = base.staged, base.tail_crc32c
        # A staged tail is always shorter than a part: the loop uploads every
        # part it fills, so a full buffer never reaches this point.
        assert fill.pieces is None or fill.pos < fill.length
        small_writes = state.record.small_writes
        if fill.pieces is not None and fill.pos > fill.new_from:
            small_writes += self._trim_to_granules(state, fill)
        if fill.pieces is not None and fill.pos > fill.new_from:
            data, start = self._remainder(fill)
            state.release(fill.reserved)
            fill.pieces = None
            segment = self._staged.new_segment(data, start, crc32c=fill.new_crc)
            state.staging.append(segment)
            await settled(self._staged.put(state.record.session_id, segment, data))
            # A folded segment starts where the earlier ones did and replaces them.
            staged = (*(s for s in staged if s.start < start), segment)
            tail_crc = fill.part_crc_now() if state.record.checksum_algorithm else 0
        release = self._leases.holds(state.record.name) and fill.offset != state.total
        if release or (staged, fill.offset, state.total) != (
                state.record.staged, state.record.offset, state.record.total):
            updated = replace(base, offset=fill.offset, crc32c=fill.crc_now(),
                              total=state.total, staged=staged, tail_crc32c=tail_crc,
                              updated_at=time.time(), small_writes=small_writes)
            state.record, state.etag = await settled(
                self._leases.put(updated, state.etag, release=release))
        if advanced is not None:
            state.committed_part = advanced[1]

    @staticmethod
    def _trim_to_granules(state: WriteState, fill: Fill) -> int:
        """Keep out of this write the bytes past its last whole granule when
        the budget of small writes is spent; 1 if the write counts as a small one."""
        if fill.offset == state.total:
            return 0
        granule = granule_of(fill.size)
        new = fill.pos - fill.new_from
        if state.record.small_writes < SMALL_WRITE_BUDGET:
            return 1 if new < granule else 0
        keep = fill.pos // granule * granule
        if keep >= fill.pos:
            return 0
        if keep <= fill.new_from:
            keep = fill.new_from  # not a whole granule of new bytes: none are kept
        assert fill.pieces is not None
        kept = b"".join(fill.pieces)[: keep - fill.new_from]
        fill.pieces = [kept]
        fill.new_crc = crc32c_extend(0, kept)
        fill.offset -= fill.pos - keep
        fill.pos = keep
        return 0

    @staticmethod
    def _remainder(fill: Fill) -> tuple[bytes, int]:
        """The bytes to stage after the last full part, and their start offset."""
        assert fill.pieces is not None
        return b"".join(fill.pieces), fill.start + fill.new_from

    async def _end_failed_write(self, state: WriteState) -> None:
        """After a failed part: record whatever contiguous prefix did land."""
        try:
            await self._commit_parts(state, release=True)
        except (UploadError, S3Refusal) as exc:
            log.warning("could not record the durable parts of %r: %s", state.record.name, exc)
        await self._drop_consumed(state)

    async def _drop_consumed(self, state: WriteState) -> None:
        """Delete staged segments that the record no longer names (they went
        into a part, or were folded into one segment)."""
        live = set(state.record.staged)
        gone = [s for s in state.prefix if s not in live]
        if not gone:
            return
        state.prefix = tuple(s for s in state.prefix if s in live)
        await self._staged.delete(state.record.session_id, gone)

    @staticmethod
    async def _stop_parts(state: WriteState) -> None:
        for task in state.tasks:
            task.cancel()
        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)

    async def _clean_after_cancel(self, state: WriteState) -> None:
        """Delete the staged objects of this write that the record does not
        name, and release the lease (another instance need not wait for it
        to expire). The record is read again: a commit may have landed after
        ``state`` last saw it."""
        if self._leases.holds(state.record.name):
            try:
                async with asyncio.timeout(_CANCEL_CLEANUP_SECONDS):
                    await self._leases.release_quietly(state.record.name)
            except TimeoutError:
                log.info("cancelled write of %r: its lease is left to expire", state.record.name)
        candidates = [*state.prefix, *state.staging]
        if not candidates:
            return
        session = state.record.session_id
        try:
            async with asyncio.timeout(_CANCEL_CLEANUP_SECONDS):
                current = await self._records.read(state.record.name)
                named = set(current[0].staged) \
                    if current is not None and current[0].session_id == session else set()
                await self._staged.delete(session, [s for s in candidates if s not in named])
        except (UploadError, TimeoutError) as exc:
            log.warning("cancelled write of %r left staged data to sweep: %r",
                        state.record.name, exc)
