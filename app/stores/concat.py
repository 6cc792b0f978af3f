"""Capabilities for joining finished uploads into one object (tus
concatenation), which a store may or may not have:

* ``Concatenation``: the store assembles the object itself from the sources'
  bytes where they lie (S3 ``UploadPartCopy``, a filesystem
  ``copy_file_range``), so nothing passes through the service again;
* ``ObjectReader``: the store reads a finished object back, so the engine can
  stream the sources into the new upload where the store cannot join them
  (S3 parts under 5 MiB).

They live beside the stores rather than in them: ``concatenation_for`` and
``reader_for`` adapt each store from the outside (``filesystem/concat.py``,
``s3/concat.py``), and a store that implements a protocol itself is used as
it is. A store with neither answers None, and the dialects then do not offer
concatenation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from app.core.model import CompletedObject, UploadInfo
from app.stores.base import Store

#: Bytes per read: large enough to keep a store busy, small enough to bound memory.
READ_SIZE = 1024 * 1024


@runtime_checkable
class ObjectReader(Protocol):
    def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        """The bytes of the object ``done`` describes, in order. Raises
        ``UploadNotFound`` if it is gone, ``StorageUnavailable`` on a backend
        failure, ``OffsetMismatch`` (offset: the bytes there) if it is no
        longer ``done.size`` bytes long."""
        ...


@runtime_checkable
class Concatenation(Protocol):
    def can_join(self, sources: Sequence[CompletedObject]) -> bool:
        """Whether ``join`` can assemble these sources (S3: every part but the
        last at least 5 MiB)."""
        ...

    async def join(self, info: UploadInfo, sources: Sequence[CompletedObject]) -> UploadInfo:
        """Fill the new, empty session ``info`` (its total the sources' sizes
        summed) with the sources' bytes in order and finish it; return the
        completed state, its CRC32C combined from the sources'. The object
        appears atomically at ``info.object_name``, as with ``finish``.
        Raises ``UploadNotFound`` if a source is gone and ``OffsetMismatch``
        if a source changed or the session moved since ``info`` was read."""
        ...


def concatenation_for(store: Store) -> Concatenation | None:
    if isinstance(store, Concatenation):
        return store
    from app.stores.filesystem.store import FilesystemStore

    if isinstance(store, FilesystemStore):
        from app.stores.filesystem.concat import FilesystemConcatenation

        return FilesystemConcatenation(store)
    from app.stores.s3.store import S3Store

    if isinstance(store, S3Store):
        from app.stores.s3.concat import S3Concatenation

        return S3Concatenation(store)
    return None


def reader_for(store: Store) -> ObjectReader | None:
    if isinstance(store, ObjectReader):
        return store
    # Imported here so a deployment without one backend's libraries still loads.
    from app.stores.filesystem.store import FilesystemStore

    if isinstance(store, FilesystemStore):
        from app.stores.filesystem.concat import FilesystemObjectReader

        return FilesystemObjectReader(store)
    from app.stores.s3.store import S3Store

    if isinstance(store, S3Store):
        from app.stores.s3.concat import S3ObjectReader

        return S3ObjectReader(store)
    return None
