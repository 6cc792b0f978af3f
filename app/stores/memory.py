"""The reference store: the Store contract kept in process memory.

It exists to be read next to ``app/stores/base.py`` and to run the engine's
unit tests without disk or network, so it is kept small and does nothing
clever. Every precondition comes from ``app.core.rules``, as in every store.

All state lives in a ``MemoryBacking``; the store object itself holds none,
so ``MemoryStore(backing)`` over an existing backing is a restarted process
(or a second one) seeing the same storage. That is how the store kit checks
restarts and stale writers against it.

How it keeps the contract's promises:

* **Durable on return**: every chunk is appended to the backing and counted in
  the session before the next one is read, so whatever ``write`` reports is
  already "stored". Nothing survives the Python process, which is why
  ``open`` logs a warning: this backend is for tests and demos.
* **Partial streams are kept**: for the same reason, an exception from the
  chunks leaves everything before it counted; it is re-raised unchanged.
* **Stale writers**: before each chunk the write checks, with
  ``rules.check_write``, that the session is still the one and at the offset
  this write last recorded, so a writer that was taken over or cancelled
  meanwhile stops without touching the newer state.

Only one event loop may use a backing: each step between awaits is atomic
because nothing here yields in the middle of changing state.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from app.config import StorageConfig
from app.core import rules
from app.core.digests import crc32c_combine, crc32c_extend
from app.core.model import PendingCallback, oldest_first
from app.core.protocol import validate_name, validate_session_name
from app.errors import OffsetMismatch, TotalMismatch, UploadNotFound
from app.stores.base import READ_SIZE, CompletedObject, UploadInfo

log = logging.getLogger(__name__)

#: What ``CompletedObject.bucket`` says for objects kept here.
BUCKET = "memory"


@dataclass
class MemoryBacking:
    """The storage a ``MemoryStore`` works on; share it to simulate a restart."""

    #: The session of each name (unfinished, or completed and not yet forgotten).
    sessions: dict[str, UploadInfo] = field(default_factory=dict)
    #: Bytes of unfinished uploads, by session id.
    data: dict[str, bytearray] = field(default_factory=dict)
    #: Finished objects, by name.
    objects: dict[str, bytes] = field(default_factory=dict)
    #: The owner each finished object was stored by, by name (kept with the
    #: object: it outlives the session record).
    owners: dict[str, str | None] = field(default_factory=dict)
    #: Completion callbacks not yet delivered, by id.
    callbacks: dict[str, PendingCallback] = field(default_factory=dict)


class MemoryStore:
    """A ``Store`` (with ``HealthCheck``, ``CallbackOutbox``, ``PendingNotices``,
    ``ObjectOwners``, ``ObjectReader`` and ``Concatenation``) over a ``MemoryBacking``."""

    def __init__(
        self,
        backing: MemoryBacking | None = None,
        config: StorageConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backing = MemoryBacking() if backing is None else backing
        self._config = StorageConfig(backend="memory") if config is None else config
        self._clock = clock

    @classmethod
    async def open(cls, config: StorageConfig) -> MemoryStore:
        log.warning(
            "storage.backend is memory: uploads and objects live in this process only "
            "and nothing survives a restart; use it for tests and demos"
        )
        return cls(MemoryBacking(), config)

    async def close(self) -> None:
        return None  # nothing to release: the backing outlives the store on purpose

    # -- Store ---------------------------------------------------------------

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
        validate_session_name(name)
        if target is not None:
            validate_name(target)
        info = rules.new_upload(
            name, session_id=uuid.uuid4().hex, total=total, content_type=content_type,
            metadata=metadata, owner=owner, target=target,
            default_part_size=self._config.part_size, now=self._clock(),
        )
        old = self.backing.sessions.get(name)
        if old is not None:
            # The bytes of a replaced unfinished upload go; a finished object stays
            # until the new upload finishes over it.
            self.backing.data.pop(old.session_id, None)
        self.backing.sessions[name] = info
        self.backing.data[info.session_id] = bytearray()
        return info

    async def get(self, name: str) -> UploadInfo:
        validate_session_name(name)
        return self._stored(name)

    async def write(
        self,
        info: UploadInfo,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
        expected_length: int | None = None,
    ) -> UploadInfo:
        # ``expected_length`` is a layout hint; bytes here are not laid out in parts.
        mine = self._stored(info.name)
        settled = rules.check_write(mine, info, total)
        if settled != mine.total:
            mine = self._save(replace(mine, total=settled))
        async for chunk in chunks:
            if not chunk:
                continue
            # Another writer may have replaced, advanced or finished the upload
            # while this one waited for its next chunk.
            rules.check_write(self._stored(info.name), mine, None)
            mine = self._append(mine, bytes(chunk))
        return mine

    async def finish(
        self, info: UploadInfo, *, md5: bytes | None = None, notify: bool = False
    ) -> UploadInfo:
        stored = self._stored(info.name)
        if rules.check_finish(stored, info):
            return stored
        content = bytes(self.backing.data.pop(stored.session_id))
        now = self._clock()
        done = replace(
            stored,
            updated_at=now,
            notify_pending=notify,
            completed=CompletedObject(
                key=stored.object_name,
                bucket=BUCKET,
                size=len(content),
                etag=_etag(content),
                crc32c=stored.crc32c,
                completed_at=now,
                md5=md5,
            ),
        )
        self.backing.objects[stored.object_name] = content
        self.backing.owners[stored.object_name] = stored.owner
        self.backing.sessions[stored.name] = done
        return done

    async def cancel(self, name: str, *, session_id: str | None = None) -> None:
        stored = self._stored(name)
        rules.check_cancel(stored, session_id)
        del self.backing.sessions[name]
        self.backing.data.pop(stored.session_id, None)

    async def list_unfinished(self) -> AsyncIterator[UploadInfo]:
        for info in list(self.backing.sessions.values()):
            if not info.is_complete:
                yield info

    async def list_completed(self) -> AsyncIterator[UploadInfo]:
        for info in list(self.backing.sessions.values()):
            if info.is_complete:
                yield info

    # -- HealthCheck ---------------------------------------------------------

    async def check_health(self) -> None:
        return None  # process memory is reachable whenever this code runs

    # -- ObjectOwners ---------------------------------------------------------

    async def owner_of(self, name: str) -> str | None:
        validate_name(name)
        return self.backing.owners.get(name) if name in self.backing.objects else None

    # -- ObjectLookup ----------------------------------------------------------

    async def object_exists(self, name: str) -> bool:
        validate_name(name)
        return name in self.backing.objects

    # -- PendingNotices ------------------------------------------------------

    async def clear_notice(self, name: str, session_id: str) -> None:
        stored = self.backing.sessions.get(name)
        if stored is not None and stored.session_id == session_id and stored.notify_pending:
            self.backing.sessions[name] = replace(stored, notify_pending=False)
    # -- ObjectReader, Concatenation -----------------------------------------

    async def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        content = self._object_of(done)
        for start in range(0, len(content), READ_SIZE):
            yield content[start : start + READ_SIZE]

    def can_join(self, sources: Sequence[CompletedObject]) -> bool:
        return True  # bytes in memory join at any size

    async def join(
        self, info: UploadInfo, sources: Sequence[CompletedObject], *, notify: bool = False
    ) -> UploadInfo:
        stored = self._stored(info.name)
        rules.check_write(stored, info, None)
        total = sum(source.size for source in sources)
        if stored.total != total or stored.offset != 0:
            raise OffsetMismatch(
                f"{info.name!r} is not an empty upload of {total} bytes", offset=stored.offset
            )
        # Every source is checked before anything changes, so a missing or
        # replaced one leaves the session as it was.
        contents = [self._object_of(source) for source in sources]
        crc = 0
        for source in sources:
            crc = crc32c_combine(crc, source.crc32c, source.size)
        self.backing.data[stored.session_id] = bytearray(b"".join(contents))
        filled = self._save(replace(stored, offset=total, crc32c=crc))
        return await self.finish(filled, notify=notify)

    # -- CallbackOutbox ------------------------------------------------------

    async def save_pending(self, callback_id: str, payload: bytes) -> None:
        self.backing.callbacks[callback_id] = PendingCallback(
            callback_id, bytes(payload), self._clock()
        )

    async def delete_pending(self, callback_id: str) -> None:
        self.backing.callbacks.pop(callback_id, None)

    async def list_pending(self) -> list[tuple[str, bytes]]:
        return oldest_first(list(self.backing.callbacks.values()))

    # -- internals -----------------------------------------------------------

    def _stored(self, name: str) -> UploadInfo:
        info = self.backing.sessions.get(name)
        if info is None:
            raise UploadNotFound(f"no upload in progress for {name!r}")
        return info

    def _object_of(self, done: CompletedObject) -> bytes:
        """The bytes of ``done`` if the object is still the one it describes."""
        content = self.backing.objects.get(done.key) if done.bucket == BUCKET else None
        if content is None:
            raise UploadNotFound(f"the object {done.key!r} no longer exists")
        if len(content) != done.size or _etag(content) != done.etag:
            raise OffsetMismatch(
                f"the object {done.key!r} was replaced since its upload finished",
                offset=len(content),
            )
        return content

    def _save(self, info: UploadInfo) -> UploadInfo:
        saved = replace(info, updated_at=self._clock())
        self.backing.sessions[info.name] = saved
        return saved

    def _append(self, mine: UploadInfo, data: bytes) -> UploadInfo:
        """Store ``data`` at the end of the upload and count it at once."""
        failure: TotalMismatch | None = None
        if mine.total is not None and mine.offset + len(data) > mine.total:
            # Keep what fits, refuse the rest: bytes past the total would make
            # the object something the client never declared.
            data = data[: mine.total - mine.offset]
            failure = TotalMismatch(
                f"more bytes than the declared total of {mine.total} for {mine.name!r}"
            )
        self.backing.data[mine.session_id] += data
        mine = self._save(
            replace(mine, offset=mine.offset + len(data), crc32c=crc32c_extend(mine.crc32c, data))
        )
        if failure is not None:
            raise failure
        return mine


def _etag(content: bytes) -> str:
    return f'"{hashlib.md5(content).hexdigest()}"'
