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

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from app.core.model import CompletedObject, PendingCallback, UploadInfo

__all__ = ["CompletedObject", "PendingCallback", "UploadInfo"]

OrphanKind = Literal["multipart_upload", "staged_data", "session_record"]


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
        expected_length: int | None = None,
    ) -> UploadInfo:
        """Append the bytes of ``chunks`` at ``info.offset`` and return the new
        durable state.

        ``info`` must be the latest state from ``get``/``create``/``write``; if
        the stored offset moved since, ``OffsetMismatch`` is raised and nothing
        is written. ``total`` settles an unknown total (``TotalMismatch`` if it
        contradicts the stored total or the stored bytes). The caller never
        sends bytes past the total. Raises ``UploadNotFound`` for a cancelled
        or completed upload.

        ``expected_length`` is a hint: the new bytes the request declares
        (None: it streams until its body ends), known before any is read. A
        store that lays bytes out in fixed parts may settle its part size
        from the first write's hint (S3: parts that match the client's chunks,
        ``rules.aligned_part_size``), and reports the settled size in the
        returned ``part_size``; the others ignore it. It is never a promise:
        ``chunks`` may end sooner (an interrupted body) and the store keeps
        what came, as always."""
        ...

    async def finish(
        self, info: UploadInfo, *, md5: bytes | None = None, notify: bool = False
    ) -> UploadInfo:
        """Turn an upload whose ``offset == total`` into the object at
        ``info.object_name`` (replacing whatever was there: the last to finish wins)
        and return the completed state. ``md5`` is recorded when given.
        ``notify``: the completed state carries ``notify_pending``, recorded no
        later than the completion itself (a crash in between must leave the
        intent behind: an unfinished record with ``notify_pending`` means the
        completion may have happened, and ``finish`` of it completes it).
        Idempotent: a completed upload is returned as it is. A store that finds
        bytes it acknowledged no longer stored as they were (S3: a part
        overwritten by a writer that lost the race for the session) never
        assembles them: it returns the upload unfinished, at the offset it can
        still vouch for, and the client is asked to resend from there."""
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


@runtime_checkable
class PendingNotices(Protocol):
    """A store that can confirm the completion callback of a session recorded
    with ``finish(..., notify=True)``."""

    async def clear_notice(self, name: str, session_id: str) -> None:
        """Clear ``notify_pending`` of the session ``session_id`` at ``name``.
        Nothing happens (and nothing is raised) if the record is gone, holds
        another session or has no pending notice."""
        ...


@runtime_checkable
class ObjectOwners(Protocol):
    """A store that keeps the owner of each finished object with the object
    itself, so it outlives the session record (forgotten by the cleanup job,
    or cancelled)."""

    async def owner_of(self, name: str) -> str | None:
        """The owner recorded when the object at ``name`` was finished; None
        if there is no object or it was stored without owner."""
        ...


@runtime_checkable
class ObjectLookup(Protocol):
    """A store that can tell whether a finished object exists at ``name``
    (Google's ``ifGenerationMatch=0``: create only if absent)."""

    async def object_exists(self, name: str) -> bool: ...


@runtime_checkable
class SharedWriting(Protocol):
    """A store that several instances may write at once, which coordinates
    them itself (S3: a lease per upload in its session record). The engine
    enters ``writing`` around every request that may write ``name``, inside
    the process's own one-writer-per-upload hold: another instance writing
    it is asked to let go first (``WriterBusy`` if it does not in time), and
    ``stop`` is called when another instance asks this request to let go;
    the request then ends its body, and the store persists what arrived."""

    def writing(self, name: str, stop: Callable[[], None]) -> AbstractAsyncContextManager[None]:
        ...


@dataclass(frozen=True)
class Orphan:
    """Storage left behind by a crash that no live upload refers to."""

    kind: OrphanKind
    #: The object key, or key prefix for a group of staged objects, it concerns.
    key: str
    #: The S3 multipart upload id, for ``multipart_upload`` orphans.
    upload_id: str | None = None
    #: Bytes it holds, as far as the store could tell cheaply (0 if unknown).
    size: int = 0
    #: Unix time of its last change (S3: ``Initiated`` / ``LastModified``).
    last_modified: float = 0.0
    #: ``staged_data``: the key of the session record that named its session
    #: when it was found, ``""`` when no record did, None when not looked up.
    #: Carried here so that any process can remove it without another full
    #: pass over the records.
    owner: str | None = None


class NotAnOrphan(Exception):
    """Raised by ``remove_orphan`` when its re-check finds the storage in use
    after all (a session record appeared for it, say); nothing was removed."""


@runtime_checkable
class OrphanSweeper(Protocol):
    """A store that can find and remove storage no session record accounts for.

    ``find_orphans`` returns only orphans whose last change is older than
    ``now - older_than``: a multipart upload a moment old may belong to a
    ``create`` that has not written its record yet. It must never return a
    completed upload's record, an object outside the store's prefix, or
    anything a live session refers to. ``remove_orphan`` checks again that the
    orphan is still one (raising ``NotAnOrphan`` if not), removes it and
    returns the bytes freed (0 when unknown, or when it was already gone).
    Everything ``remove_orphan`` needs is in the ``Orphan``: it may run in
    another process than the ``find_orphans`` that found it.
    """

    async def find_orphans(self, older_than: float, now: float) -> list[Orphan]: ...

    async def remove_orphan(self, orphan: Orphan) -> int: ...


class CallObserver(Protocol):
    """Told about every backend call a store makes (for metrics).

    ``error`` is None for a success, else the backend's error code (S3: the
    error code or HTTP status) or, when no answer came at all, the transport
    exception's class name. Called on the event loop: it must not block.
    """

    def __call__(self, operation: str, seconds: float, error: str | None) -> None: ...


@runtime_checkable
class ReportsCalls(Protocol):
    """A store that can report its backend calls to a ``CallObserver``.
    Observing twice with the same observer reports each call once."""

    def observe_calls(self, observer: CallObserver) -> None: ...


#: Bytes per read of a finished object: large enough to keep a store busy,
#: small enough to bound memory.
READ_SIZE = 1024 * 1024


@runtime_checkable
class ObjectReader(Protocol):
    """A store that can read a finished object back, so the engine can stream
    sources into a new upload where the store cannot join them itself (tus
    concatenation of S3 parts under 5 MiB)."""

    def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        """The bytes of the object ``done`` describes, in order. Raises
        ``UploadNotFound`` if it is gone, ``StorageUnavailable`` on a backend
        failure, ``OffsetMismatch`` (offset: the bytes there) if it is no
        longer ``done.size`` bytes long or was replaced."""
        ...


@runtime_checkable
class Concatenation(Protocol):
    """A store that joins finished objects into one where they lie (S3
    ``UploadPartCopy``, a filesystem ``copy_file_range``), so no byte passes
    through the service again (tus concatenation)."""

    def can_join(self, sources: Sequence[CompletedObject]) -> bool:
        """Whether ``join`` can assemble these sources (S3: every part but the
        last at least 5 MiB)."""
        ...

    async def join(
        self, info: UploadInfo, sources: Sequence[CompletedObject], *, notify: bool = False
    ) -> UploadInfo:
        """Fill the new, empty session ``info`` (its total the sources' sizes
        summed) with the sources' bytes in order and finish it (``notify`` as
        for ``finish``: the intent recorded no later than the completion); return the
        completed state, its CRC32C combined from the sources'. The object
        appears atomically at ``info.object_name``, as with ``finish``.
        Raises ``UploadNotFound`` if a source is gone and ``OffsetMismatch``
        if a source changed or the session moved since ``info`` was read."""
        ...
