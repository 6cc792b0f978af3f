"""``ObjectReader`` and ``Concatenation`` for the filesystem store: a
finished object is a plain file under the store's root
(``CompletedObject.bucket`` is that root).

Joining uses the store's semi-public steps (its lock, sidecar and data-file
paths) and then its own ``finish``, so placing the object, crash repair and
the completion record stay the store's. The sources are trusted to be what
their uploads finished with (size checked): they are hidden objects named by
an unguessable id."""

from __future__ import annotations

import asyncio
import errno
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from app.core import rules
from app.core.digests import crc32c_combine
from app.core.model import CompletedObject, UploadInfo
from app.errors import InvalidName, OffsetMismatch, StorageUnavailable, UploadNotFound
from app.stores.concat import READ_SIZE
from app.stores.filesystem.store import FilesystemStore, _stamp

#: copy_file_range refusals that a plain in-kernel sendfile copy can do instead.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


class FilesystemObjectReader:
    def __init__(self, store: FilesystemStore) -> None:
        self._root = os.path.realpath(store._root)

    async def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(self._open, done)
        try:
            left = done.size
            while left > 0:
                data = await asyncio.to_thread(os.read, fd, min(READ_SIZE, left))
                if not data:
                    raise OffsetMismatch(
                        f"{done.key!r} is shorter than the {done.size} bytes it was finished with",
                        offset=done.size - left,
                    )
                left -= len(data)
                yield data
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {done.key!r}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def _open(self, done: CompletedObject) -> int:
        path = os.path.realpath(os.path.join(self._root, done.key))
        # A symlink placed inside the root must not read files outside it.
        if not path.startswith(self._root + os.sep):
            raise InvalidName(f"{done.key!r} leads outside the storage root")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise UploadNotFound(f"the object {done.key!r} no longer exists") from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot open {done.key!r}: {exc.strerror}") from None
        size = os.fstat(fd).st_size
        if size != done.size:
            os.close(fd)
            raise OffsetMismatch(
                f"{done.key!r} holds {size} bytes, not the {done.size} it was finished with",
                offset=size,
            )
        return fd


class FilesystemConcatenation:
    """Joins finished objects into a session's data file with
    ``copy_file_range`` (a reflink or an in-kernel copy: the bytes never
    reach Python), then finishes the session the store's own way."""

    def __init__(self, store: FilesystemStore) -> None:
        self._store = store
        self._reader = FilesystemObjectReader(store)

    def can_join(self, sources: Sequence[CompletedObject]) -> bool:
        return True

    async def join(self, info: UploadInfo, sources: Sequence[CompletedObject]) -> UploadInfo:
        filled = await asyncio.to_thread(self._fill, info, sources)
        return await self._store.finish(filled)

    def _fill(self, info: UploadInfo, sources: Sequence[CompletedObject]) -> UploadInfo:
        store = self._store
        total = sum(source.size for source in sources)
        with store._locked(info.name) as lock_fd:
            stored = store._load_locked(info.name)
            rules.check_write(stored, info, None)
            if stored.total != total or stored.offset != 0:
                raise OffsetMismatch(
                    f"{info.name!r} is not an empty upload of {total} bytes", offset=stored.offset
                )
            path = store._data_path(stored.session_id)
            try:
                # Any writer of this session elsewhere sees its token gone and stops.
                os.pwrite(lock_fd, uuid.uuid4().hex.encode("ascii"), 0)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise StorageUnavailable(f"cannot prepare {path}: {exc.strerror}") from None
            crc = 0
            try:
                for source in sources:
                    self._copy(source, fd)
                    crc = crc32c_combine(crc, source.crc32c, source.size)
                if store._fsync:
                    os.fsync(fd)
            except OSError as exc:
                raise StorageUnavailable(f"cannot join into {path}: {exc.strerror}") from None
            finally:
                os.close(fd)
            filled = _stamp(replace(stored, offset=total, crc32c=crc, updated_at=time.time()))
            store._write_sidecar(filled)
        return filled

    def _copy(self, source: CompletedObject, fd: int) -> None:
        src = self._reader._open(source)
        try:
            left = source.size
            while left > 0:
                try:
                    copied = os.copy_file_range(src, fd, left)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_RANGE:
                        raise
                    copied = os.sendfile(fd, src, None, left)
                if copied == 0:
                    raise OffsetMismatch(
                        f"{source.key!r} is shorter than the {source.size} bytes it "
                        "was finished with", offset=source.size - left,
                    )
                left -= copied
        finally:
            os.close(src)
