"""The write path: appending a stream of chunks to an upload's data file.

A write claims the upload (the writer token in the lock file), then appends
batches, each under the lock and only after checking that the upload is still
its own (``_check_still_ours``), and records progress in the sidecar: data is
fsynced before the sidecar offset that counts it is written. If another
process replaced, advanced, took over, finished or cancelled the upload
meanwhile, the write drops what it still holds, changes nothing and raises
``OffsetMismatch`` (``UploadNotFound`` when the session is gone), so a stalled
writer can never record over newer work or append to a finished object.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass, replace

from app.core import rules
from app.core.digests import crc32c_extend
from app.core.model import UploadInfo
from app.errors import OffsetMismatch, StorageUnavailable, TotalMismatch, UploadNotFound
from app.stores.filesystem import fsio, locks, recovery, sidecars
from app.stores.filesystem.paths import Layout

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
#: Chunks are gathered up to this size before one thread hop writes them, so
#: tiny chunks do not cost a thread switch each and big ones never block the loop.
WRITE_BATCH = 4 * _MIB
#: A long request records its progress this often, so a crash mid-request
#: keeps most of what already reached the disk.
CHECKPOINT_BYTES = 64 * _MIB


@dataclass
class _Append:
    """One ``write`` in progress: the open data file and what has reached it."""

    #: Durable state as last recorded in the sidecar (plus a newly settled total).
    recorded: UploadInfo
    fd: int
    path: str
    #: This write's token in the lock file; another write starting replaces it.
    token: bytes
    #: The data file was created by this write, so its directory entry needs an fsync.
    created: bool
    offset: int
    crc32c: int
    #: Something not yet in the sidecar: new bytes or a newly settled total.
    dirty: bool
    #: A write to the data file failed; nothing more is appended in this call.
    failed: bool = False
    #: An fsync failed: the kernel may have dropped the dirty pages, and a later
    #: fsync can report success regardless, so nothing more may be recorded.
    broken: bool = False
    #: Another writer or process changed the upload: nothing more is written.
    stale: bool = False


async def write(
    layout: Layout, info: UploadInfo, chunks: AsyncIterable[bytes], total: int | None
) -> UploadInfo:
    """``Store.write`` for the filesystem store."""
    append = await fsio.in_thread(_begin, layout, info, total)
    pending, failure = await _feed(layout, append, chunks)
    if failure is not None:
        closer = getattr(chunks, "aclose", None)
        if closer is not None and not isinstance(failure, asyncio.CancelledError):
            try:
                await closer()
            except Exception:
                log.debug("closing the chunk stream failed", exc_info=True)
    try:
        result = await fsio.in_thread(_end, layout, append, pending)
    except Exception:
        if isinstance(failure, asyncio.CancelledError):
            raise failure from None  # a cancellation is never swallowed
        raise
    if failure is not None:
        raise failure
    return result


async def _feed(
    layout: Layout, append: _Append, chunks: AsyncIterable[bytes]
) -> tuple[list[bytes], BaseException | None]:
    """Append ``chunks`` in batches; returns the last batch, not yet written,
    and whatever stopped the stream early."""
    limit = append.recorded.total
    pending: list[bytes] = []
    pending_size = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            # A copy, because google_crc32c takes only bytes and the caller may
            # reuse its buffer while this one waits for a batch.
            data = bytes(chunk)
            if limit is not None and append.offset + pending_size + len(data) > limit:
                # Keep what fits, refuse the rest: bytes past the total would
                # make the object something the client never declared.
                pending.append(data[: limit - append.offset - pending_size])
                return pending, TotalMismatch(
                    f"more bytes than the declared total of {limit} for "
                    f"{append.recorded.name!r}"
                )
            pending.append(data)
            pending_size += len(data)
            if pending_size >= WRITE_BATCH:
                batch, pending, pending_size = pending, [], 0
                await fsio.in_thread(_append_batch, layout, append, batch)
    except BaseException as exc:  # a client gone mid-body still keeps what arrived
        return pending, exc
    return pending, None


def _begin(layout: Layout, info: UploadInfo, total: int | None) -> _Append:
    with locks.locked(layout, info.name) as lock_fd:
        stored = recovery.load_locked(layout, info.name)
        total = rules.check_write(stored, info, total)
        dirty = total != stored.total
        if dirty:
            stored = replace(stored, total=total)
        path = layout.data_path(stored.session_id)
        fd, created = _open_data(path, stored.offset)
        try:
            # Take over: a writer still streaming elsewhere (a stalled request
            # on another process) sees its token gone at its next step and stops.
            token = locks.claim(layout, info.name, lock_fd)
        except BaseException:
            os.close(fd)
            raise
    return _Append(
        recorded=stored,
        fd=fd,
        path=path,
        token=token,
        created=created,
        offset=stored.offset,
        crc32c=stored.crc32c,
        dirty=dirty,
    )


def _open_data(path: str, offset: int) -> tuple[int, bool]:
    """Open the data file positioned at ``offset``; True if it was created."""
    try:
        created = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise fsio.unavailable("open", path, exc) from exc
    try:
        # Bytes past the recorded offset were never acknowledged.
        if os.fstat(fd).st_size != offset:
            os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        raise fsio.unavailable("prepare", path, exc) from exc
    return fd, created


def _check_still_ours(layout: Layout, append: _Append, lock_fd: int) -> None:
    """Under the lock: refuse to go on unless nothing else touched the
    upload since this write started or last recorded."""
    name = append.recorded.name
    token = locks.current_token(layout, name, lock_fd)
    stored = sidecars.read(layout, name)
    if stored is None:
        append.stale = True
        raise UploadNotFound(f"the upload {name!r} was cancelled meanwhile")
    if stored.session_id != append.recorded.session_id:
        reason = "was replaced by a new upload"
    elif stored.completed is not None:
        reason = "was completed by another request"
    elif stored.offset != append.recorded.offset or token != append.token:
        reason = "is being written by another request"
    elif _holds_data_file(append):
        return
    else:
        reason = "lost the data file this write opened"
    append.stale = True
    raise OffsetMismatch(
        f"{name!r} {reason}; it holds {stored.offset} bytes", offset=stored.offset
    )


def _holds_data_file(append: _Append) -> bool:
    """The open data file is still the one at its path (not removed or replaced)."""
    try:
        held = os.fstat(append.fd)
        current = os.stat(append.path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise fsio.unavailable("inspect", append.path, exc) from exc
    return (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)


def _append_batch(layout: Layout, append: _Append, batch: list[bytes]) -> None:
    with locks.locked(layout, append.recorded.name) as lock_fd:
        _check_still_ours(layout, append, lock_fd)
        _append_locked(layout, append, batch)


def _append_locked(layout: Layout, append: _Append, batch: list[bytes]) -> None:
    data = b"".join(batch)
    try:
        fsio.write_all(append.fd, data)
    except OSError as exc:
        # Whatever part of the batch reached the file is not counted, and is
        # cut off by the next write.
        append.failed = True
        raise fsio.unavailable("write", append.path, exc) from exc
    append.crc32c = crc32c_extend(append.crc32c, data)
    append.offset += len(data)
    append.dirty = True
    if append.offset - append.recorded.offset >= CHECKPOINT_BYTES:
        _record(layout, append)


def _record(layout: Layout, append: _Append) -> UploadInfo:
    """Make the appended bytes durable, then count them in the sidecar.
    The caller holds the lock and has checked the upload is still its own."""
    if layout.fsync:
        try:
            os.fsync(append.fd)
            if append.created:
                fsio.fsync_dir(layout.data_dir)
        except OSError as exc:
            append.failed = append.broken = True
            raise fsio.unavailable("flush", append.path, exc) from exc
        append.created = False
    recorded = sidecars.stamp(
        replace(
            append.recorded,
            offset=append.offset,
            crc32c=append.crc32c,
            updated_at=time.time(),
        )
    )
    sidecars.write(layout, recorded)
    append.recorded = recorded
    append.dirty = False
    return recorded


def _end(layout: Layout, append: _Append, batch: list[bytes]) -> UploadInfo:
    """Append the last batch, record everything, close the data file."""
    error: StorageUnavailable | None = None
    try:
        write = bool(batch) and not append.failed
        if append.stale or not (write or (append.dirty and not append.broken)):
            return append.recorded  # nothing to write, or no longer ours to write
        with locks.locked(layout, append.recorded.name) as lock_fd:
            _check_still_ours(layout, append, lock_fd)
            if write:
                try:
                    _append_locked(layout, append, batch)
                except StorageUnavailable as exc:
                    error = exc  # still record the bytes that did get written
            if append.dirty and not append.broken:
                result = _record(layout, append)
            else:
                result = append.recorded
    finally:
        try:
            os.close(append.fd)
        except OSError:
            pass
    if error is not None:
        raise error
    return result

