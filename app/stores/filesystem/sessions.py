"""Starting, finishing and cancelling a session: the steps besides appends.

Each runs in a worker thread under the name's lock. The order of the steps is
what makes a crash at any point recoverable:

* replacing or cancelling an unfinished upload removes its data before its
  sidecar, so a crash in between leaves a session that repairs to offset 0,
  never an orphaned data file nobody would clean up;
* finishing marks the sidecar completed *before* renaming the data file to
  ``root/<name>``, so a crash in between is rolled forward by the next access
  (``recovery``) instead of leaving a session whose data has vanished.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from app.core import rules
from app.core.model import CompletedObject, UploadInfo
from app.errors import StorageUnavailable, UploadNotFound
from app.stores.filesystem import fsio, owners, recovery, sidecars
from app.stores.filesystem.locks import locked
from app.stores.filesystem.paths import (
    Layout,
    check_destination,
    open_destination,
    place,
    rename_into,
)

log = logging.getLogger(__name__)


def etag(crc32c: int, size: int) -> str:
    """An MD5 of the whole object cannot be computed across resumes, so the
    ETag is the strong validator ``"<crc32c as 8 hex digits>-<size>"``, which
    changes whenever the content does as far as CRC32C can tell."""
    return f'"{crc32c:08x}-{size}"'


def create(layout: Layout, info: UploadInfo) -> UploadInfo:
    check_destination(layout, info.object_name)
    with locked(layout, info.name):
        old = sidecars.read(layout, info.name, discard_damaged=True)
        if old is not None:
            old_data = layout.data_path(old.session_id)
            if old.completed is not None:
                if os.path.exists(old_data):
                    place(layout, old.object_name, old_data)  # it was acknowledged as finished
            else:
                fsio.remove(old_data, "discard the replaced upload", fsync=layout.fsync)
        stamped = sidecars.stamp(info)
        sidecars.write(layout, stamped)
        return stamped


def finish(layout: Layout, info: UploadInfo, md5: bytes | None, notify: bool) -> UploadInfo:
    with locked(layout, info.name):
        stored = recovery.load_locked(layout, info.name)
        if rules.check_finish(stored, info):
            return stored
        data_path = layout.data_path(stored.session_id)
        _seal_data(layout, data_path, stored.offset)
        target = stored.object_name
        dir_fd, leaf = open_destination(layout, target)
        try:
            now = time.time()
            completed = CompletedObject(
                key=target,
                bucket=layout.root,
                size=stored.offset,
                etag=etag(stored.crc32c, stored.offset),
                crc32c=stored.crc32c,
                completed_at=now,
                md5=md5,
            )
            # The intent to notify goes in the same atomic sidecar write that
            # marks the upload completed: there is no moment without it.
            done = sidecars.stamp(
                replace(stored, updated_at=now, completed=completed, notify_pending=notify)
            )
            # The owner goes with the object, before it appears: it must
            # outlive this sidecar (forgotten by the cleanup job, cancelled).
            previous_owner = owners.read_raw(layout, target)
            owners.write(layout, target, stored.owner)
            try:
                sidecars.write(layout, done)
                rename_into(layout, dir_fd, target, leaf, data_path)
            except BaseException:
                # Without the rename the object does not exist: undo the mark so
                # the upload can be finished again, and the old object keeps its owner.
                try:
                    sidecars.write(layout, stored)
                    owners.restore(layout, target, previous_owner)
                except StorageUnavailable:
                    log.exception("could not restore the session of %r", info.name)
                raise
        finally:
            os.close(dir_fd)
        return done


def _seal_data(layout: Layout, data_path: str, size: int) -> None:
    """Make the data file exactly ``size`` durable bytes before it becomes the object."""
    try:
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            if layout.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if layout.fsync:
            fsio.fsync_dir(layout.data_dir)
    except OSError as exc:
        raise fsio.unavailable("flush", data_path, exc) from exc


def cancel(layout: Layout, name: str, session_id: str | None) -> None:
    with locked(layout, name):
        existed = os.path.exists(layout.sidecar_path(name))
        info = sidecars.read(layout, name, discard_damaged=True)
        if info is None:
            if existed:
                return  # it was damaged, and is gone now
            raise UploadNotFound(f"no upload in progress for {name!r}")
        rules.check_cancel(info, session_id)
        data_path = layout.data_path(info.session_id)
        if info.completed is not None:
            if os.path.exists(data_path):
                place(layout, info.object_name, data_path)  # it was acknowledged as finished
        else:
            fsio.remove(data_path, "discard the data of", fsync=layout.fsync)
        sidecars.remove(layout, name)


def clear_notice(layout: Layout, name: str, session_id: str) -> None:
    with locked(layout, name):
        stored = sidecars.read(layout, name)
        if stored is None or stored.session_id != session_id or not stored.notify_pending:
            return
        sidecars.write(layout, replace(stored, notify_pending=False))
