"""``ObjectReader`` for the filesystem store: a finished object is a plain
file under the store's root (``CompletedObject.bucket`` is that root)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from app.core.model import CompletedObject
from app.errors import InvalidName, OffsetMismatch, StorageUnavailable, UploadNotFound
from app.stores.concat import READ_SIZE
from app.stores.filesystem.store import FilesystemStore


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
