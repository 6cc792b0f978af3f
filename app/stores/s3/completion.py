"""Completing an upload: the multipart upload (with its staged tail as the
last part) becomes the object at ``name``, tagged with the session that wrote
it, so a retried finish can tell "already completed by me" from "gone"."""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from app.errors import BadRequest, StorageUnavailable, UploadNotFound
from app.stores.base import CompletedObject
from app.stores.s3.client import S3Client
from app.stores.s3.errors import NO_UPLOAD_CODES, S3Refusal
from app.stores.s3.parts import BufferGauge, upload_part
from app.stores.s3.records import OWNER_META, SESSION_META, Layout, Record
from app.stores.s3.staged import StagedData

log = logging.getLogger("app.stores.s3")

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


class Completion:
    """Turns a record whose ``offset == total`` into the finished object."""

    def __init__(self, client: S3Client, layout: Layout, staged: StagedData,
                 gauge: BufferGauge) -> None:
        self._client = client
        self._layout = layout
        self._staged = staged
        self._gauge = gauge

    async def complete(self, record: Record) -> CompletedObject:
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
            listed = await self._client.parts(key, record.upload_id)
            count = -(-total // record.part_size)
            if record.staged:
                listed[count] = await self._upload_staged_tail(record)
            parts = self._complete_parts(record, listed, count)
            result = await self._client.call(
                "CompleteMultipartUpload", NO_UPLOAD_CODES, Key=key,
                UploadId=record.upload_id, MultipartUpload={"Parts": parts},
            )
        except S3Refusal:
            return await self._completed_earlier(record)
        return self._completed(record, str(result["ETag"]), total)

    async def _abort_quietly(self, record: Record) -> None:
        try:
            await self._client.abort_upload(self._layout.object_key(record.object_name),
                                            record.upload_id)
        except StorageUnavailable:
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

    async def _upload_staged_tail(self, record: Record) -> dict[str, Any]:
        start = record.staged[0].start
        buf = bytearray(record.offset - start)
        self._gauge.hold(len(buf))
        try:
            await self._staged.fill(record, record.staged, buf)
            result = await upload_part(self._client, self._layout, record,
                                       start // record.part_size + 1, buf, record.tail_crc32c)
            return {**result, "Size": len(buf)}
        finally:
            self._gauge.release(len(buf))

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
