"""Completing an upload: the multipart upload (with its staged tail as the
last part) becomes the object at ``name``, tagged with the session that wrote
it, so a retried finish can tell "already completed by me" from "gone"."""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from app.core.budget import MemoryBudget
from app.core.digests import crc32c_b64
from app.errors import BadRequest, StorageUnavailable, UploadError, UploadNotFound
from app.stores.base import CompletedObject
from app.stores.s3.client import S3Client
from app.stores.s3.errors import INVALID_PART_CODES, NO_UPLOAD_CODES, S3Refusal
from app.stores.s3.parts import BufferGauge, bare_etag, upload_part
from app.stores.s3.records import OWNER_META, SESSION_META, Layout, Part, Record
from app.stores.s3.staged import StagedData

log = logging.getLogger("app.stores.s3")

#: Uploads of a staged tail per completion: another writer's late part can
#: only replace it so often before the finish gives up (and is retried).
_TAIL_ATTEMPTS = 3

_HEADER_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def object_metadata(
    metadata: Mapping[str, str], session_id: str, owner: str | None = None
) -> dict[str, str]:
    """User metadata as S3 can carry it in headers: keys must be header tokens;
    values outside printable ASCII are RFC 2047 encoded (as AWS recommends).
    The session and the owner go in keys of their own, never user-set."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not _HEADER_TOKEN.fullmatch(key):
            raise BadRequest(f"metadata key {key!r} cannot be stored as S3 object metadata")
        out[key.lower()] = header_value(value)
    out[SESSION_META] = session_id
    out.pop(OWNER_META, None)
    if owner is not None:
        out[OWNER_META] = header_value(owner)
    return out


class PartOverwritten(Exception):
    """S3 holds other bytes for part ``number`` than the record names."""

    def __init__(self, number: int) -> None:
        super().__init__(f"part {number} was overwritten")
        self.number = number


def header_value(value: str) -> str:
    if value.isascii() and value.isprintable() and value == value.strip():
        return value
    encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
    return f"=?UTF-8?B?{encoded}?="


def from_header_value(value: str) -> str:
    """Inverse of ``header_value``."""
    if value.startswith("=?UTF-8?B?") and value.endswith("?="):
        try:
            return base64.b64decode(value[10:-2], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return value
    return value


#: Awaited before each request S3 cannot condition; raises to stop.
Fence = Callable[[], Awaitable[None]]


async def _no_fence() -> None:
    return None


class Completion:
    """Turns a record whose ``offset == total`` into the finished object."""

    def __init__(self, client: S3Client, layout: Layout, staged: StagedData,
                 gauge: BufferGauge, *, budget: MemoryBudget) -> None:
        self._client = client
        self._layout = layout
        self._staged = staged
        self._gauge = gauge
        self._budget = budget

    async def complete(self, record: Record, fence: Fence = _no_fence) -> CompletedObject:
        """The object, assembled from exactly the parts the record names.
        ``PartOverwritten`` when S3 holds another part than the record's (a
        writer that lost the record race uploaded it late: UploadPart takes no
        condition); nothing is completed then. ``fence`` is awaited before
        each request S3 cannot condition (it raises if this process no longer
        holds the upload's lease)."""
        total = record.total
        assert total is not None
        key = self._layout.object_key(record.object_name)
        if total == 0:
            # S3 cannot complete an MPU without parts.
            put = await self._client.call(
                "PutObject", Key=key, Body=b"", ContentType=record.content_type,
                Metadata=object_metadata(record.metadata, record.session_id, record.owner),
            )
            await self._abort_quietly(record)
            return self._completed(record, str(put["ETag"]), 0)
        try:
            if record.parts is None:
                return await self._complete_listed(record, key, fence)
            parts = list(record.parts)
            for attempt in range(_TAIL_ATTEMPTS):
                if record.staged:
                    parts[len(record.parts):] = [await self._upload_staged_tail(record, fence)]
                try:
                    result = await self._assemble(record, key, parts, fence)
                    break
                except PartOverwritten as exc:
                    # The staged tail is still ours to upload again; a full
                    # part is not (its bytes were the client's, not kept here).
                    if not record.staged or exc.number != len(parts) \
                            or attempt == _TAIL_ATTEMPTS - 1:
                        raise
        except S3Refusal:
            return await self._completed_earlier(record)
        return self._completed(record, str(result["ETag"]), total)

    async def _assemble(self, record: Record, key: str, parts: list[Part],
                        fence: Fence) -> dict[str, Any]:
        assert record.total is not None
        if len(parts) != -(-record.total // record.part_size):
            raise StorageUnavailable(
                f"the session record of {record.name!r} names {len(parts)} parts for "
                f"{record.total} bytes"
            )
        await self._check_parts(record, key, parts)
        await fence()
        try:
            return await self._client.call(
                "CompleteMultipartUpload", NO_UPLOAD_CODES | INVALID_PART_CODES,
                Key=key, UploadId=record.upload_id,
                MultipartUpload={"Parts": self._part_list(record, parts)},
            )
        except S3Refusal as exc:
            if exc.code not in INVALID_PART_CODES:
                raise
        # A late part landed between the check and the completion, and S3,
        # comparing the ETags itself, refused: find out which one.
        await self._check_parts(record, key, parts)
        raise StorageUnavailable(f"S3 refused the parts of {record.name!r} (InvalidPart)")

    async def _check_parts(self, record: Record, key: str, parts: list[Part]) -> None:
        """``PartOverwritten`` for the first part S3 holds other bytes for."""
        listed = await self._client.parts(key, record.upload_id)
        for number, part in enumerate(parts, start=1):
            found = listed.get(number)
            if found is None or bare_etag(found.get("ETag")) != part.etag:
                log.error("upload %r: S3 holds another part %d than its record names (a late "
                          "part of a writer that lost the record)", record.name, number)
                raise PartOverwritten(number)

    @staticmethod
    def _part_list(record: Record, parts: list[Part]) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for number, part in enumerate(parts, start=1):
            entry: dict[str, Any] = {"PartNumber": number, "ETag": f'"{part.etag}"'}
            if record.checksum_algorithm:
                # S3 requires each part's checksum when the MPU was created with one.
                entry["ChecksumCRC32C"] = crc32c_b64(part.crc32c)
            entries.append(entry)
        return entries

    async def _complete_listed(self, record: Record, key: str, fence: Fence) -> CompletedObject:
        """A record written before parts were recorded: its parts come from
        ListParts, as they did then."""
        assert record.total is not None
        listed = await self._client.parts(key, record.upload_id)
        count = -(-record.total // record.part_size)
        if record.staged:
            tail = await self._upload_staged_tail(record, fence)
            listed[count] = {"ETag": tail.etag, "Size": record.offset - record.staged[0].start}
        await fence()
        result = await self._client.call(
            "CompleteMultipartUpload", NO_UPLOAD_CODES, Key=key,
            UploadId=record.upload_id,
            MultipartUpload={"Parts": self._complete_parts(record, listed, count)},
        )
        return self._completed(record, str(result["ETag"]), record.total)

    async def _abort_quietly(self, record: Record) -> None:
        try:
            await self._client.abort_upload(self._layout.object_key(record.object_name),
                                            record.upload_id)
        except UploadError:
            pass  # logged by the client; an unaborted MPU only costs storage until swept

    def _completed(self, record: Record, etag: str, size: int) -> CompletedObject:
        return CompletedObject(
            key=self._layout.object_key(record.object_name),
            bucket=self._client.bucket,
            size=size,
            etag=etag,
            crc32c=record.crc32c,
            completed_at=time.time(),
        )

    async def _completed_earlier(self, record: Record) -> CompletedObject:
        """The MPU is gone: it is complete if the object carries this session."""
        head = await self._client.head(self._layout.object_key(record.object_name))
        if head is None or head.get("Metadata", {}).get(SESSION_META) != record.session_id:
            raise UploadNotFound(f"the multipart upload of {record.name!r} no longer exists")
        return self._completed(record, str(head["ETag"]), int(head["ContentLength"]))

    async def _upload_staged_tail(self, record: Record, fence: Fence) -> Part:
        start = record.staged[0].start
        size = record.offset - start
        # Waiting for the budget leaves the upload as it was: an Overloaded
        # completion is retried by the client's next probe.
        await self._budget.acquire(size)
        buf = bytearray(size)
        self._gauge.hold(size)
        try:
            await self._staged.fill(record, record.staged, buf)
            await fence()
            result = await upload_part(self._client, self._layout, record,
                                       start // record.part_size + 1, [buf], record.tail_crc32c)
            return Part(bare_etag(result["ETag"]), record.tail_crc32c, record.crc32c)
        finally:
            del buf
            self._gauge.release(size)
            self._budget.release(size)

    @staticmethod
    def _complete_parts(
        record: Record, listed: dict[int, dict[str, Any]], count: int
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
