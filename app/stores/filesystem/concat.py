"""Finished objects read back and joined (the store's ``ObjectReader`` and
``Concatenation``): a finished object is a plain file under the root
(``CompletedObject.bucket`` is that root).

Joining fills the session's data file under the name's lock, with the same
steps as an append (``locks``, ``recovery``, ``sidecars``), and leaves the
finish to ``sessions.finish``, so placing the object, crash repair and the
completion record stay where they always are. The sources are trusted to be
what their uploads finished with (their size is checked): they are hidden
objects named by an unguessable id.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from app.core import rules
from app.core.digests import crc32c_combine
from app.core.model import CompletedObject, UploadInfo
from app.errors import InvalidName, OffsetMismatch, UploadNotFound
from app.stores.base import READ_SIZE
from app.stores.filesystem import fsio, locks, recovery, sidecars
from app.stores.filesystem.paths import Layout

#: copy_file_range refusals that a plain in-kernel sendfile copy can do instead.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


class Joiner:
    """Reads finished objects back and joins them into a session's data
    file with ``copy_file_range`` (a reflink or an in-kernel copy: the bytes
    never reach Python)."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    async def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        fd = await fsio.in_thread(self._open, done)
        try:
            left = done.size
            while left > 0:
                try:
                    data = await fsio.in_thread(os.read, fd, min(READ_SIZE, left))
                except OSError as exc:
                    raise fsio.unavailable("read", done.key, exc) from exc
                if not data:
                    raise OffsetMismatch(
                        f"{done.key!r} is shorter than the {done.size} bytes it was finished with",
                        offset=done.size - left,
                    )
                left -= len(data)
                yield data
        finally:
            os.close(fd)

    def fill(self, info: UploadInfo, sources: Sequence[CompletedObject]) -> UploadInfo:
        """Blocking: copy the sources into the empty session ``info`` and
        record them; the caller then finishes it."""
        layout = self._layout
        total = sum(source.size for source in sources)
        with locks.locked(layout, info.name) as lock_fd:
            stored = recovery.load_locked(layout, info.name)
            rules.check_write(stored, info, None)
            if stored.total != total or stored.offset != 0:
                raise OffsetMismatch(
                    f"{info.name!r} is not an empty upload of {total} bytes", offset=stored.offset
                )
            # Any writer of this session elsewhere sees its token gone and stops.
            locks.claim(layout, info.name, lock_fd)
            path = layout.data_path(stored.session_id)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise fsio.unavailable("prepare", path, exc) from exc
            crc = 0
            try:
                for source in sources:
                    self._copy(source, fd)
                    crc = crc32c_combine(crc, source.crc32c, source.size)
                if layout.fsync:
                    # Durable before the sidecar counts the bytes, as for appends.
                    os.fsync(fd)
            except OSError as exc:
                raise fsio.unavailable("join into", path, exc) from exc
            finally:
                os.close(fd)
            filled = sidecars.stamp(replace(stored, offset=total, crc32c=crc,
                                            updated_at=time.time()))
            sidecars.write(layout, filled)
        return filled

    def _open(self, done: CompletedObject) -> int:
        root = self._layout.root
        path = os.path.realpath(os.path.join(root, done.key))
        # A symlink placed inside the root must not read files outside it.
        if not path.startswith(root + os.sep):
            raise InvalidName(f"{done.key!r} leads outside the storage root")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise UploadNotFound(f"the object {done.key!r} no longer exists") from None
        except OSError as exc:
            raise fsio.unavailable("open", done.key, exc) from exc
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise fsio.unavailable("inspect", done.key, exc) from exc
        if size != done.size:
            os.close(fd)
            raise OffsetMismatch(
                f"{done.key!r} holds {size} bytes, not the {done.size} it was finished with",
                offset=size,
            )
        return fd

    def _copy(self, source: CompletedObject, fd: int) -> None:
        src = self._open(source)
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
