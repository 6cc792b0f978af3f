"""Finished objects read back and joined (the S3 store's ``ObjectReader`` and
``Concatenation``).

Reading is ranged GETs of the finished object. Joining copies each source
into the session's own multipart upload with ``UploadPartCopy`` (S3 moves the
bytes; the service sends none), completes it and records the session as
completed with a conditional record write. S3 wants every part but the last
to be at least 5 MiB, so sources smaller than that cannot be joined here
(``can_join`` says so, and the caller streams them instead); a source above
5 GiB is copied in ranges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from app.core import rules
from app.core.digests import crc32c_combine
from app.core.model import CompletedObject, UploadInfo
from app.core.protocol import MAX_PART_SIZE, MAX_PARTS, MIB
from app.errors import OffsetMismatch, UploadNotFound
from app.stores.base import READ_SIZE
from app.stores.s3.client import S3Client
from app.stores.s3.errors import MISSING_KEY_CODES, NO_UPLOAD_CODES, S3Refusal
from app.stores.s3.records import Layout, Records

#: S3's smallest part other than the last.
MIN_PART = 5 * MIB
#: Part copies in flight at once for one join.
COPIES_IN_FLIGHT = 8
#: Bytes per GET: one request per range keeps a dropped connection cheap.
RANGE_SIZE = 8 * READ_SIZE
#: What a failed If-Match on a source answers: it was replaced.
_REPLACED = frozenset({"PreconditionFailed", "412"})


class Joiner:
    """Reads and joins finished objects of the store's bucket."""

    def __init__(self, client: S3Client, records: Records, layout: Layout) -> None:
        self._client = client
        self._records = records
        self._layout = layout

    async def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        self._check_bucket(done)
        offset = 0
        while offset < done.size:
            end = min(offset + RANGE_SIZE, done.size) - 1
            try:
                # If-Match: the object must still be the one that upload finished.
                async for data in self._client.read_range(
                    done.key, offset, end, MISSING_KEY_CODES | _REPLACED,
                    if_match=done.etag, chunk_size=READ_SIZE,
                ):
                    offset += len(data)
                    yield data
            except S3Refusal as refusal:
                raise _source_error(done, refusal, offset) from None
            if offset <= end:
                raise OffsetMismatch(
                    f"{done.key!r} ended at byte {offset}, before the {done.size} it was "
                    "finished with", offset=offset,
                )

    def can_join(self, sources: Sequence[CompletedObject]) -> bool:
        pieces = sum(len(_pieces(source.size)) for source in sources)
        return (
            bool(sources)
            and all(source.size >= MIN_PART for source in sources[:-1])
            and sources[-1].size > 0
            and pieces <= MAX_PARTS
        )

    async def join(
        self, info: UploadInfo, sources: Sequence[CompletedObject], *, notify: bool = False
    ) -> UploadInfo:
        record, etag = await self._records.load(info.name)
        rules.check_write(record.to_info(etag), info, None)
        total = sum(source.size for source in sources)
        if record.total != total or record.offset != 0:
            raise OffsetMismatch(
                f"{info.name!r} is not an empty upload of {total} bytes", offset=record.offset
            )
        key = self._layout.object_key(record.object_name)
        for source in sources:
            await self._check_source(source)
        jobs = []
        for source in sources:
            for first, last in _pieces(source.size):
                jobs.append((len(jobs) + 1, source, first, last))
        slots = asyncio.Semaphore(COPIES_IN_FLIGHT)

        async def copy(number: int, source: CompletedObject, first: int, last: int) -> Any:
            async with slots:
                return await self._copy_part(record.upload_id, key, number, source, first, last)

        copied = await asyncio.gather(*(copy(*job) for job in jobs))
        # Checksums go in only when S3 reported one for every part (real S3 on
        # an upload created with CRC32C does, and then requires them).
        with_checksums = all(part.get("ChecksumCRC32C") for part in copied)
        parts = []
        for (number, *_), part in zip(jobs, copied, strict=True):
            entry = {"PartNumber": number, "ETag": part["ETag"]}
            if with_checksums:
                entry["ChecksumCRC32C"] = part["ChecksumCRC32C"]
            parts.append(entry)
        if notify and not record.notify_pending:
            # The intent first, as in ``S3Store.finish``: a crash between the
            # completion and the record write must not lose the callback.
            record = replace(record, notify_pending=True)
            etag = await self._records.put(record, if_match=etag)
        try:
            result = await self._client.call(
                "CompleteMultipartUpload", NO_UPLOAD_CODES, Key=key,
                UploadId=record.upload_id, MultipartUpload={"Parts": parts},
            )
        except S3Refusal:
            raise UploadNotFound(f"the multipart upload of {info.name!r} is gone") from None
        crc = 0
        for source in sources:
            crc = crc32c_combine(crc, source.crc32c, source.size)
        now = time.time()
        done = replace(
            record, offset=total, crc32c=crc, updated_at=now,
            completed=CompletedObject(key=key, bucket=self._client.bucket, size=total,
                                      etag=str(result["ETag"]), crc32c=crc, completed_at=now),
        )
        return done.to_info(await self._records.put(done, if_match=etag))

    def _check_bucket(self, source: CompletedObject) -> None:
        # Every call goes to the store's own bucket; an object elsewhere is
        # none of this store's.
        if source.bucket != self._client.bucket:
            raise UploadNotFound(f"the object {source.key!r} is not in this store's bucket")

    async def _check_source(self, source: CompletedObject) -> None:
        """The source is still the object its upload finished with. The copy
        says so again (``CopySourceIfMatch``, atomic on S3); this check also
        holds where a provider ignores that condition (moto does)."""
        self._check_bucket(source)
        try:
            head = await self._client.call(
                "HeadObject", MISSING_KEY_CODES | _REPLACED, Key=source.key,
                IfMatch=source.etag,
            )
        except S3Refusal as refusal:
            raise _source_error(source, refusal, 0) from None
        if int(head["ContentLength"]) != source.size:
            raise OffsetMismatch(
                f"the object {source.key!r} holds {head['ContentLength']} bytes, not "
                f"{source.size}", offset=int(head["ContentLength"]),
            )

    async def _copy_part(self, upload_id: str, key: str, number: int,
                         source: CompletedObject, first: int, last: int) -> dict[str, Any]:
        try:
            result = await self._client.call(
                "UploadPartCopy", MISSING_KEY_CODES | _REPLACED | NO_UPLOAD_CODES,
                Key=key, UploadId=upload_id, PartNumber=number,
                CopySource={"Bucket": source.bucket, "Key": source.key},
                CopySourceRange=f"bytes={first}-{last}",
                # The source must still be the object its upload finished with.
                CopySourceIfMatch=source.etag,
            )
        except S3Refusal as refusal:
            if refusal.code in NO_UPLOAD_CODES:
                raise UploadNotFound(f"the multipart upload of {key!r} is gone") from None
            raise _source_error(source, refusal, 0) from None
        part: dict[str, Any] = result["CopyPartResult"]
        return part


def _source_error(source: CompletedObject, refusal: S3Refusal,
                  offset: int) -> OffsetMismatch | UploadNotFound:
    if refusal.code in _REPLACED:
        return OffsetMismatch(
            f"the object {source.key!r} was replaced since its upload finished", offset=offset
        )
    return UploadNotFound(f"the object {source.key!r} no longer exists")


def _pieces(size: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges of one source, each a part S3 accepts (at most
    5 GiB; split evenly, so none falls under 5 MiB); none for an empty one,
    which ``can_join`` refuses rather than crash on."""
    if size == 0:
        return []
    count = max(1, -(-size // MAX_PART_SIZE))
    step = -(-size // count)
    return [(start, min(start + step, size) - 1) for start in range(0, size, step)]
