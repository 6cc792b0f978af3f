"""The Store contract: the only thing the upload engine knows about storage.

A store keeps *uploads*, each identified by its client-visible ``name``. An
upload is a byte sequence that grows by appends at its current ``offset`` until
it is finished into an object at ``name``, or cancelled. How bytes are laid out
(S3 parts of equal size, staged tails, files) is the store's business alone:
S3's 5 MiB minimum part never leaks out of the S3 store.

Promises every store keeps (checked by the store kit, ``tests/stores/kit/``;
``app/stores/memory.py`` is the reference implementation, and
``docs/stores.md`` says how to write a store and run the kit against it):

* **Durable on return.** When ``write`` returns, every byte it counts in the
  returned ``offset`` survives a crash of this process, and a new store
  instance over the same backing storage reports the same state.
* **Nothing invented.** ``offset`` never counts a byte that is not stored, and
  ``crc32c`` is always the CRC32C of exactly bytes ``[0, offset)``.
* **Partial streams are kept.** If the ``chunks`` iterable passed to ``write``
  ends early, or raises, the bytes received before that point are persisted
  (the exception is re-raised afterwards). A storage failure part-way leaves
  the upload at the last durable offset, never damaged.
* **One error vocabulary.** Stores raise only ``app.errors`` types:
  ``UploadNotFound`` for an unknown/cancelled upload, ``OffsetMismatch`` when
  the stored offset is not the one the caller wrote at (another writer got
  there first), ``TotalMismatch`` for a total that contradicts the stored one
  or the bytes already stored, ``TooLarge`` for a size the backend cannot hold,
  ``StorageUnavailable`` when the backend is down or failing. Backend
  exceptions never escape.
* **Idempotent finish.** ``finish`` on a completed upload returns the same
  completed ``UploadInfo``; the object appears atomically at ``name``.

Optional features are separate ``runtime_checkable`` protocols below, found
with ``isinstance(store, Capability)``: a store declares what it can do by
implementing it, never by raising ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Protocol, runtime_checkable

from app.core.model import CompletedObject, PendingCallback, UploadInfo

__all__ = ["CompletedObject", "PendingCallback", "UploadInfo"]


class Store(Protocol):
    """Storage for resumable uploads. All methods are coroutine-safe for
    different names; the caller serialises writers of one name."""

    async def create(
        self,
        name: str,
        *,
        total: int | None,
        content_type: str,
        metadata: Mapping[str, str],
        owner: str | None,
        target: str | None = None,
    ) -> UploadInfo:
        """Start a new empty upload at ``name``, replacing (and discarding) any
        unfinished or completed session of that name. The object at ``name``
        (or at ``target``, when the session has a name of its own), if any,
        stays until the new upload finishes. Raises ``TooLarge`` if ``total``
        exceeds what the backend can hold."""
        ...

    async def get(self, name: str) -> UploadInfo:
        """Current state; raises ``UploadNotFound`` if there is no session."""
        ...

    async def write(
        self,
        info: UploadInfo,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
    ) -> UploadInfo:
        """Append the bytes of ``chunks`` at ``info.offset`` and return the new
        durable state.

        ``info`` must be the latest state from ``get``/``create``/``write``; if
        the stored offset moved since, ``OffsetMismatch`` is raised and nothing
        is written. ``total`` settles an unknown total (``TotalMismatch`` if it
        contradicts the stored total or the stored bytes). The caller never
        sends bytes past the total. Raises ``UploadNotFound`` for a cancelled
        or completed upload."""
        ...

    async def finish(self, info: UploadInfo, *, md5: bytes | None = None) -> UploadInfo:
        """Turn an upload whose ``offset == total`` into the object at
        ``info.object_name`` (replacing whatever was there: the last to finish wins)
        and return the completed state. ``md5`` is recorded when given.
        Idempotent: a completed upload is returned as it is."""
        ...

    async def cancel(self, name: str, *, session_id: str | None = None) -> None:
        """Discard an upload and all its stored data; ``UploadNotFound`` if none.
        For a completed upload only its session record goes: the object stays.
        With ``session_id``, only that session is discarded: if ``name`` now
        holds another one (replaced meanwhile), ``UploadNotFound`` is raised and
        nothing changes."""
        ...

    def list_unfinished(self) -> AsyncIterator[UploadInfo]:
        """Every unfinished upload, in no particular order (for the cleanup job)."""
        ...

    def list_completed(self) -> AsyncIterator[UploadInfo]:
        """Every completed upload whose session record is still kept, so the
        cleanup job can forget old ones."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks."""
        ...


@runtime_checkable
class HealthCheck(Protocol):
    """A store that can tell whether its backend is reachable and writable."""

    async def check_health(self) -> None:
        """Return if healthy; raise ``StorageUnavailable`` with the reason otherwise."""
        ...


@runtime_checkable
class CallbackOutbox(Protocol):
    """Durable storage for completion callbacks that still have to be delivered."""

    async def save_pending(self, callback_id: str, payload: bytes) -> None: ...

    async def delete_pending(self, callback_id: str) -> None:
        """Remove a delivered callback; a missing one is not an error."""
        ...

    async def list_pending(self) -> list[tuple[str, bytes]]: ...
