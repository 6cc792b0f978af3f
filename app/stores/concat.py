"""The ``ObjectReader`` capability: read a finished object back, so uploads
can be joined (tus concatenation) from objects the store already holds.

It lives beside the stores rather than in them: ``reader_for`` adapts each
store from the outside (``filesystem/concat.py``, ``s3/concat.py``), and a
store that implements ``read_object`` itself is used as it is. A store with
neither answers None, and the dialects then do not offer concatenation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from app.core.model import CompletedObject
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
