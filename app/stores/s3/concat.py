"""``ObjectReader`` and ``Concatenation`` for the S3 store.

Reading is ranged GETs of the finished object. Joining copies each source
into the session's own multipart upload with ``UploadPartCopy`` (S3 moves the
bytes; the service sends none), completes it and records the session as
completed, through the store's own client, error translation and conditional
record writes. S3 wants every part but the last to be at least 5 MiB, so
sources smaller than that cannot be joined here (``can_join`` says so, and
the caller streams them instead); a source above 5 GiB is copied in ranges.
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
from app.stores.concat import READ_SIZE
from app.stores.s3.errors import _MISSING_KEY_CODES, _NO_UPLOAD_CODES, _S3Refusal
from app.stores.s3.store import S3Store

#: S3's smallest part other than the last.
MIN_PART = 5 * MIB
#: Part copies in flight at once for one join.
_COPIES_IN_FLIGHT = 8

#: Bytes per GET: one request per range keeps a dropped connection cheap.
_RANGE = 8 * READ_SIZE
_REPLACED = frozenset({"PreconditionFailed", "412"})


class S3ObjectReader:
    def __init__(self, store: S3Store) -> None:
        self._store = store

    async def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        offset = 0
        while offset < done.size:
            end = min(offset + _RANGE, done.size) - 1
            # If-Match: the object must still be the one that upload finished.
            params = {"Bucket": done.bucket, "Key": done.key,
                      "Range": f"bytes={offset}-{end}", "IfMatch": done.etag}
            try:
                async with self._store._s3_errors("GetObject", _MISSING_KEY_CODES | _REPLACED):
                    result = await self._store._client.get_object(**params)
                    async with result["Body"] as stream:
                        while data := await stream.read(READ_SIZE):
                            offset += len(data)
                            yield data
            except _S3Refusal as refusal:
                if refusal.code in _REPLACED:
                    raise OffsetMismatch(
                        f"the object {done.key!r} was replaced since its upload finished",
                        offset=offset,
                    ) from None
                raise UploadNotFound(f"the object {done.key!r} no longer exists") from None
            if offset <= end:
                raise OffsetMismatch(
                    f"{done.key!r} ended at byte {offset}, before the {done.size} it was "
                    "finished with", offset=offset,
                )


class S3Concatenation:
    def __init__(self, store: S3Store) -> None:
        self._store = store

    def can_join(self, sources: Sequence[CompletedObject]) -> bool:
        pieces = sum(len(_pieces(source.size)) for source in sources)
        return (
            bool(sources)
            and all(source.size >= MIN_PART for source in sources[:-1])
            and sources[-1].size > 0
            and pieces <= MAX_PARTS
        )

    async def join(self, info: UploadInfo, sources: Sequence[CompletedObject]) -> UploadInfo:
        store = self._store
        record, etag = await store._load_record(info.name)
        rules.check_write(record.to_info(etag), info, None)
        total = sum(source.size for source in sources)
        if record.total != total or record.offset != 0:
            raise OffsetMismatch(
                f"{info.name!r} is not an empty upload of {total} bytes", offset=record.offset
            )
        key = store._object_key(record.object_name)
        for source in sources:
            await self._check_source(source)
        jobs = []
        for source in sources:
            for first, last in _pieces(source.size):
                jobs.append((len(jobs) + 1, source, first, last))
        slots = asyncio.Semaphore(_COPIES_IN_FLIGHT)

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
        try:
            result = await store._call(
                "CompleteMultipartUpload", _NO_UPLOAD_CODES, Bucket=store._bucket, Key=key,
                UploadId=record.upload_id, MultipartUpload={"Parts": parts},
            )
        except _S3Refusal:
            raise UploadNotFound(f"the multipart upload of {info.name!r} is gone") from None
        crc = 0
        for source in sources:
            crc = crc32c_combine(crc, source.crc32c, source.size)
        now = time.time()
        done = replace(
            record, offset=total, crc32c=crc, updated_at=now,
            completed=CompletedObject(key=key, bucket=store._bucket, size=total,
                                      etag=str(result["ETag"]), crc32c=crc, completed_at=now),
        )
        return done.to_info(await store._put_record(done, if_match=etag))

    async def _check_source(self, source: CompletedObject) -> None:
        """The source is still the object its upload finished with. The copy
        says so again (``CopySourceIfMatch``, atomic on S3); this check also
        holds where a provider ignores that condition (moto does)."""
        store = self._store
        try:
            head = await store._call(
                "HeadObject", _MISSING_KEY_CODES | _REPLACED, Bucket=source.bucket,
                Key=source.key, IfMatch=source.etag,
            )
        except _S3Refusal as refusal:
            if refusal.code in _REPLACED:
                raise OffsetMismatch(
                    f"the object {source.key!r} was replaced since its upload finished",
                    offset=0,
                ) from None
            raise UploadNotFound(f"the object {source.key!r} no longer exists") from None
        if int(head["ContentLength"]) != source.size:
            raise OffsetMismatch(
                f"the object {source.key!r} holds {head['ContentLength']} bytes, not "
                f"{source.size}", offset=int(head["ContentLength"]),
            )

    async def _copy_part(self, upload_id: str, key: str, number: int,
                         source: CompletedObject, first: int, last: int) -> dict[str, Any]:
        store = self._store
        try:
            result = await store._call(
                "UploadPartCopy", _MISSING_KEY_CODES | _REPLACED | _NO_UPLOAD_CODES,
                Bucket=store._bucket, Key=key, UploadId=upload_id, PartNumber=number,
                CopySource={"Bucket": source.bucket, "Key": source.key},
                CopySourceRange=f"bytes={first}-{last}",
                # The source must still be the object its upload finished with.
                CopySourceIfMatch=source.etag,
            )
        except _S3Refusal as refusal:
            if refusal.code in _REPLACED:
                raise OffsetMismatch(
                    f"the object {source.key!r} was replaced since its upload finished",
                    offset=0,
                ) from None
            raise UploadNotFound(f"the object {source.key!r} no longer exists") from None
        part: dict[str, Any] = result["CopyPartResult"]
        return part


def _pieces(size: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges of one source, each a part S3 accepts (at most
    5 GiB; split evenly, so none falls under 5 MiB)."""
    count = max(1, -(-size // MAX_PART_SIZE))
    step = -(-size // count)
    return [(start, min(start + step, size) - 1) for start in range(0, size, step)]
