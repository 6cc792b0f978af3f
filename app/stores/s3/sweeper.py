"""The S3 store's ``OrphanSweeper``: finding and removing what crashed uploads
left in the bucket (a multipart upload whose ``create`` died before its record
was written, a record whose multipart upload was aborted by a ``cancel`` that
died half-way, staged objects of a losing or crashed write).

Everything ``remove_orphan`` re-checks comes from the bucket or from the
``Orphan`` itself, so one process may find orphans and another remove them. Other
applications may keep multipart uploads under the same prefix (with prefix
``""``, anywhere in the bucket): only an upload this store marked
(``markers.py``) is ever swept, never anything else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from app.errors import StorageUnavailable
from app.stores.base import NotAnOrphan, Orphan
from app.stores.s3.client import S3Client
from app.stores.s3.errors import (
    CONFLICT_CODES,
    MISSING_KEY_CODES,
    NO_UPLOAD_CODES,
    UNSUPPORTED_CODES,
    S3Refusal,
)
from app.stores.s3.markers import Markers
from app.stores.s3.records import (
    READ_CONCURRENCY,
    SESSION_META,
    Layout,
    Record,
    Records,
    parse_listed,
)
from app.stores.s3.staged import StagedData

log = logging.getLogger("app.stores.s3")

_T = TypeVar("_T")
_R = TypeVar("_R")


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
    without_upload: list[tuple[Record, str, int, float]] = field(default_factory=list)


class S3OrphanSweeper:
    """``OrphanSweeper`` over one S3 store's prefix."""

    def __init__(self, client: S3Client, layout: Layout, records: Records,
                 staged: StagedData, markers: Markers) -> None:
        self._markers = markers
        self._client = client
        self._layout = layout
        self._records = records
        self._staged = staged

    async def find_orphans(self, older_than: float, now: float) -> list[Orphan]:
        cutoff = now - older_than
        # Uploads are listed first, records next, staged data last. A session
        # started after a listing is then either seen by a later one or younger
        # than the cutoff, so a fresh upload never looks orphaned.
        uploads = [upload async for upload in self._list_uploads()]
        # Markers are written before their upload is created, so every marker
        # of a listed upload is in this later listing.
        markers = await self._markers.index()
        marked = {
            upload.upload_id: marker.key for upload in uploads
            if (marker := self._markers.marking(markers, upload.key, upload.initiated))
        }
        uploads = [upload for upload in uploads if upload.upload_id in marked]
        index = await self._index_sessions({u.upload_id for u in uploads}, cutoff)
        if index.unreadable:
            log.warning("%d session records are unreadable: multipart uploads and staged "
                        "data they may refer to are not swept", len(index.unreadable))
        orphans = await self._orphan_uploads(uploads, index, cutoff, marked)
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

    # -- finding ------------------------------------------------------------------

    async def _index_sessions(self, listed_ids: set[str], cutoff: float) -> _SessionIndex:
        """One pass over the records: what they refer to, and the unfinished
        ones whose multipart upload was not in ``listed_ids``."""
        index = _SessionIndex()
        async with aclosing(self._records.scan()) as records:
            async for key, item, loaded in records:
                if loaded is None:
                    continue  # deleted since it was listed: it refers to nothing now
                record = parse_listed(key, loaded[0])
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
        self, uploads: list[_ListedUpload], index: _SessionIndex, cutoff: float,
        marked: dict[str, str],
    ) -> list[Orphan]:
        candidates = [
            upload for upload in uploads
            if upload.initiated <= cutoff
            and upload.upload_id not in index.upload_ids
            and self._layout.record_key(upload.key[len(self._layout.prefix):])
            not in index.unreadable
        ]
        # Sized now so that a dry run can tell what a sweep would free.
        sizes = await _bounded_map(
            lambda u: self._client.upload_size(u.key, u.upload_id), candidates
        )
        return [
            Orphan("multipart_upload", upload.key, upload_id=upload.upload_id, size=size,
                   last_modified=upload.initiated, owner=marked[upload.upload_id])
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
        orphans: list[Orphan] = []
        async with aclosing(self._client.list_objects(self._layout.staged_root)) as items:
            async for item in items:
                key = str(item["Key"])
                parts = self._layout.split_staged(key)
                changed = _timestamp(item.get("LastModified"))
                if parts is None or changed > cutoff:
                    continue
                session_id, leaf = parts
                owner = index.sessions.get(session_id)
                if owner is not None and leaf in owner[1]:
                    continue
                if owner is None and index.unreadable:
                    continue  # the session may be one of the unreadable records
                orphans.append(Orphan("staged_data", key, size=int(item.get("Size", 0)),
                                      last_modified=changed,
                                      owner="" if owner is None else owner[0]))
        return orphans

    # -- removing -------------------------------------------------------------------

    async def _remove_upload(self, orphan: Orphan) -> int:
        upload_id = orphan.upload_id
        name = self._layout.name_of(orphan.key)
        if upload_id is None or name is None:
            raise NotAnOrphan("not a multipart upload of this store")
        marker = orphan.owner
        if not marker or not marker.startswith(self._markers.root()):
            raise NotAnOrphan("no marker of this store says the multipart upload is its own")
        size = await self._client.upload_size(orphan.key, upload_id)
        if size is None:
            return 0  # aborted by someone else meanwhile
        if not await self._markers.still_marks(marker, orphan.last_modified):
            # Only what this store provably created is ever aborted.
            raise NotAnOrphan("no marker of this store says the multipart upload is its own")
        # Checked last, right before the abort: a create that was slow to
        # write its record may have done so since the sweep listed it.
        current = await self._records.read(name)
        if current is not None and current[0].upload_id == upload_id \
                and current[0].completed is None:
            raise NotAnOrphan(f"the session record of {name!r} refers to it")
        aborted = await self._client.abort_upload(orphan.key, upload_id)
        await self._client.delete_keys([marker], quiet=True)
        return size if aborted else 0

    async def _remove_record(self, orphan: Orphan) -> int:
        if not self._layout.is_record_key(orphan.key):
            raise NotAnOrphan("not a session record of this store")
        loaded = await self._client.get_bytes(orphan.key)
        if loaded is None:
            return 0
        raw, etag = loaded
        record = parse_listed(orphan.key, raw)
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
        await self._staged.delete(record.session_id, record.staged)
        await self._markers.delete(self._layout.object_key(record.object_name),
                                   record.session_id)
        self._staged.forget(record.session_id)
        return len(raw) + sum(segment.length for segment in record.staged)

    async def _remove_staged(self, orphan: Orphan) -> int:
        parts = self._layout.split_staged(orphan.key)
        if parts is None:
            raise NotAnOrphan("not staged data of this store")
        session_id, leaf = parts
        head = await self._client.head(orphan.key)
        if head is None:
            return 0
        # HEAD dates have whole seconds, listings may have milliseconds.
        if _timestamp(head.get("LastModified")) > orphan.last_modified + 1:
            raise NotAnOrphan("it was rewritten since it was found")
        owner = orphan.owner
        if owner is None:
            owner = await self._session_record_key(session_id) or ""
        # A session that had no record cannot get one back (ids are never
        # reused), so only a record that existed needs reading again.
        if owner:
            await self._check_unreferenced(owner, session_id, leaf)
        if not await self._delete_if_match(orphan.key, str(head["ETag"])):
            return 0
        self._staged.forget(session_id, [leaf])
        return int(head.get("ContentLength", 0))

    async def _check_unreferenced(self, record_key: str, session_id: str, leaf: str) -> None:
        """``NotAnOrphan`` if the record at ``record_key`` names the staged leaf."""
        loaded = await self._client.get_bytes(record_key)
        record = None if loaded is None else parse_listed(record_key, loaded[0])
        if loaded is not None and record is None:
            raise NotAnOrphan("its session record is unreadable")
        if record is not None and record.session_id == session_id \
                and record.completed is None \
                and any(segment.leaf == leaf for segment in record.staged):
            raise NotAnOrphan("its upload refers to it")

    async def _why_alive(self, record: Record) -> str | None:
        """Why an unfinished record is still in use; None if it is not."""
        key = self._layout.object_key(record.object_name)
        try:
            await self._client.call("ListParts", NO_UPLOAD_CODES, Key=key,
                                    UploadId=record.upload_id, MaxParts=1)
            return "its multipart upload exists"
        except S3Refusal:
            pass
        head = await self._client.head(key)
        if head is not None and head.get("Metadata", {}).get(SESSION_META) == record.session_id:
            # A finish completed the object but died before updating the
            # record; a retried finish still needs the record to answer.
            return "its upload was finished"
        return None

    async def _session_record_key(self, session_id: str) -> str | None:
        """The key of the unfinished record of ``session_id``, by a full pass
        (for an orphan that does not say which record owned it)."""
        async with aclosing(self._records.parsed()) as records:
            async for key, _, record, _ in records:
                if record is None:
                    raise NotAnOrphan("some session records are unreadable")
                if record.session_id == session_id and record.completed is None:
                    return key
        return None

    async def _delete_if_match(self, key: str, etag: str) -> bool:
        """Delete ``key`` if it is still the version with ``etag``; False if it
        is gone already, ``NotAnOrphan`` if it changed."""
        try:
            await self._client.call(
                "DeleteObject", CONFLICT_CODES | MISSING_KEY_CODES | UNSUPPORTED_CODES,
                Key=key, IfMatch=etag,
            )
        except S3Refusal as exc:
            if exc.code in MISSING_KEY_CODES:
                return False
            if exc.code in CONFLICT_CODES:
                raise NotAnOrphan("it changed while it was checked") from None
            # No conditional deletes on this provider: the checks just made
            # are all the guard there is.
            await self._client.call("DeleteObject", Key=key)
        return True

    async def _list_uploads(self) -> AsyncIterator[_ListedUpload]:
        """Every multipart upload under the prefix (ListMultipartUploads pages at 1,000)."""
        prefix = self._layout.prefix
        params: dict[str, Any] = {"Prefix": prefix}
        while True:
            page = await self._client.call("ListMultipartUploads", **params)
            for upload in page.get("Uploads", []):
                key = str(upload["Key"])
                # Even a backend that ignores Prefix must not widen a sweep.
                if key.startswith(prefix):
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
    fn: Callable[[_T], Awaitable[_R]], items: Iterable[_T], limit: int = READ_CONCURRENCY
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
