"""S3 store orphan sweep: ``S3OrphanSweeper``, the ``OrphanSweeper`` half of
``S3Store`` (a mixin it inherits), finding and removing what crashed uploads
left in the bucket, and what a sweep lists."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from app.errors import StorageUnavailable
from app.ops.cleanup import NotAnOrphan, Orphan
from app.stores.s3.errors import (
    _CONFLICT_CODES,
    _MISSING_KEY_CODES,
    _NO_UPLOAD_CODES,
    _UNSUPPORTED_CODES,
    _S3Refusal,
)
from app.stores.s3.records import _SESSION_META, _parse_listed, _Record

if TYPE_CHECKING:
    from app.stores.s3.records import _Segment, _StagedCache

log = logging.getLogger("app.stores.s3")

#: S3 requests one listing pass keeps in flight (record reads, ListParts of
#: orphan candidates): one GET per record is the price of the layout, and done
#: one at a time it dominates a big listing; more would crowd the pool the
#: uploads share.
_READ_CONCURRENCY = 16

_T = TypeVar("_T")
_R = TypeVar("_R")


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


class S3OrphanSweeper:
    """The ``OrphanSweeper`` of ``S3Store``, which inherits it: the store's
    keys, listings and S3 calls are what it works with (declared below)."""

    if TYPE_CHECKING:
        _bucket: str
        _prefix: str
        _reserved: str
        _cache: _StagedCache
        _staged_owners: dict[str, str | None]

        async def _call(
            self, operation: str, handled: Collection[str] = (), /, **params: Any
        ) -> dict[str, Any]: ...

        async def _get_bytes(self, key: str) -> tuple[bytes, str] | None: ...

        async def _read_record(self, name: str) -> tuple[_Record, str] | None: ...

        async def _delete_keys(self, keys: list[str], *, quiet: bool) -> None: ...

        async def _parts(self, key: str, upload_id: str) -> dict[int, dict[str, Any]]: ...

        def _list_objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]: ...

        def _scan_records(
            self,
        ) -> AsyncIterator[tuple[dict[str, Any], tuple[bytes, str] | None]]: ...

        def _object_key(self, name: str) -> str: ...

        def _record_key(self, name: str) -> str: ...

        def _staged_root(self) -> str: ...

        def _staged_key(self, session_id: str, segment: _Segment) -> str: ...

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
                Key=self._object_key(record.object_name), UploadId=record.upload_id, MaxParts=1,
            )
            return "its multipart upload exists"
        except _S3Refusal:
            pass
        head = await self._head(self._object_key(record.object_name))
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

def _timestamp(value: object) -> float:
    """Unix time of an S3 date; infinity (never old) when there is none."""
    if isinstance(value, datetime):
        return value.timestamp()
    return float("inf")
