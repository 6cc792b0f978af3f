"""The embedded default store: uploads kept as files under one root directory.

Layout under ``root`` (the resolved ``storage.filesystem.root``)::

    root/<name>                             finished objects, renamed into place
    root/.uploads/sessions/<sha256>.json    one session record ("sidecar") per name
    root/.uploads/data/<session_id>         the bytes of an unfinished upload
    root/.uploads/callbacks/<sha256>.json   completion callbacks not yet delivered
    root/.uploads/locks/<sha256>.lock       per-name lock (``flock``) and writer token
    root/.uploads/owners/<sha256>.json      who stored each finished object
    root/.uploads/tmp/                      temp files of atomic writes, health probes

This module only composes; each job has its own module:

* ``paths``     the layout, name checks, safe walking (``O_NOFOLLOW``), placing objects
* ``locks``     the per-name ``flock`` and the writer token (takeover across processes)
* ``sidecars``  session records, replaced atomically
* ``recovery``  reading a session and repairing what a crash left behind
* ``append``    the write path: batches, checkpoints, stale-writer checks
* ``sessions``  create, finish and cancel, in a crash-safe order
* ``outbox``    pending completion callbacks
* ``concat``    finished objects read back and joined (tus concatenation)
* ``fsio``      blocking I/O helpers and the ``OSError`` boundary

Durability (with ``filesystem.fsync``, the default): data is fsynced before
the sidecar offset that counts it is written, and sidecars are replaced
atomically (temp file, fsync, rename, fsync of the directory).

Several processes may share a root. The caller serialises writers of one name
only within its own process, so every step that changes an upload runs under
the name's ``flock``, and a write re-checks under it, before each step, that
the upload is still its own (see ``append``).

The store needs a POSIX system.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from typing import ParamSpec, TypeVar

from app.config import StorageConfig
from app.core import rules
from app.errors import StorageUnavailable
from app.stores.base import CompletedObject, UploadInfo
from app.stores.filesystem import append, fsio, outbox, owners, recovery, sessions, sidecars
from app.stores.filesystem.concat import Joiner
from app.stores.filesystem.paths import (
    Layout,
    check_folders,
    check_name_text,
    check_session_name,
    prepare_root,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: Sidecars read per thread hop while listing.
_LIST_BATCH = 64


class FilesystemStore:
    """Uploads as files under one root directory; see the module docstring."""

    def __init__(self, config: StorageConfig, layout: Layout) -> None:
        self._config = config
        self._layout = layout
        self._joiner = Joiner(layout)

    @classmethod
    async def open(cls, config: StorageConfig) -> FilesystemStore:
        return cls(config, await fsio.in_thread(prepare_root, config))

    async def close(self) -> None:
        # Every operation finishes its own I/O before returning: nothing to release.
        return None

    async def _run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn`` in a worker thread, once the store's folders proved to be the
        ones found at start-up (a symlink planted as ``.uploads/data`` later
        would otherwise send bytes and records outside the root)."""

        def checked() -> _T:
            check_folders(self._layout)
            return fn(*args, **kwargs)

        return await fsio.in_thread(checked)

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
        check_session_name(self._layout, name)
        if target is not None:
            check_name_text(self._layout, target)
        info = rules.new_upload(
            name, session_id=uuid.uuid4().hex, total=total, content_type=content_type,
            metadata=metadata, owner=owner, target=target,
            default_part_size=self._config.part_size, now=time.time(),
        )
        return await self._run(sessions.create, self._layout, info)

    async def get(self, name: str) -> UploadInfo:
        check_session_name(self._layout, name)
        return await self._run(recovery.load, self._layout, name)

    async def write(
        self,
        info: UploadInfo,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
        expected_length: int | None = None,
    ) -> UploadInfo:
        # ``expected_length`` is a layout hint; one file has no parts to match it to.
        check_session_name(self._layout, info.name)
        await fsio.in_thread(check_folders, self._layout)
        return await append.write(self._layout, info, chunks, total)

    async def finish(
        self, info: UploadInfo, *, md5: bytes | None = None, notify: bool = False
    ) -> UploadInfo:
        check_session_name(self._layout, info.name)
        return await self._run(sessions.finish, self._layout, info, md5, notify)

    async def cancel(self, name: str, *, session_id: str | None = None) -> None:
        check_session_name(self._layout, name)
        await self._run(sessions.cancel, self._layout, name, session_id)

    def list_unfinished(self) -> AsyncIterator[UploadInfo]:
        return self._list_sessions(completed=False)

    def list_completed(self) -> AsyncIterator[UploadInfo]:
        return self._list_sessions(completed=True)

    async def _list_sessions(self, *, completed: bool) -> AsyncIterator[UploadInfo]:
        files = await self._run(fsio.list_dir, self._layout.sessions_dir, ".json")
        for start in range(0, len(files), _LIST_BATCH):
            infos = await self._run(sidecars.read_many, files[start : start + _LIST_BATCH])
            for info in infos:
                if info.is_complete == completed:
                    yield info

    # -- HealthCheck ---------------------------------------------------------

    async def check_health(self) -> None:
        await self._run(_check_health, self._layout)

    # -- ObjectOwners ---------------------------------------------------------

    async def owner_of(self, name: str) -> str | None:
        check_name_text(self._layout, name)
        return await self._run(owners.owner_of, self._layout, name)

    # -- ObjectLookup ----------------------------------------------------------

    async def object_exists(self, name: str) -> bool:
        check_name_text(self._layout, name)
        return await self._run(os.path.isfile, self._layout.object_path(name))

    # -- PendingNotices ------------------------------------------------------

    async def clear_notice(self, name: str, session_id: str) -> None:
        check_session_name(self._layout, name)
        await self._run(sessions.clear_notice, self._layout, name, session_id)

    # -- ObjectReader, Concatenation -----------------------------------------

    async def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        await self._run(check_folders, self._layout)
        async for data in self._joiner.read_object(done):
            yield data

    def can_join(self, sources: Sequence[CompletedObject]) -> bool:
        return True  # a file can be assembled from pieces of any size

    async def join(
        self, info: UploadInfo, sources: Sequence[CompletedObject], *, notify: bool = False
    ) -> UploadInfo:
        check_session_name(self._layout, info.name)
        # Through _run: the store's own folders are checked before a byte is written.
        filled = await self._run(self._joiner.fill, info, sources)
        return await self.finish(filled, notify=notify)

    # -- CallbackOutbox ------------------------------------------------------

    async def save_pending(self, callback_id: str, payload: bytes) -> None:
        await self._run(outbox.save, self._layout, callback_id, payload)

    async def delete_pending(self, callback_id: str) -> None:
        await self._run(outbox.delete, self._layout, callback_id)

    async def list_pending(self) -> list[tuple[str, bytes]]:
        return await self._run(outbox.list_all, self._layout)


def _check_health(layout: Layout) -> None:
    """Write, flush and remove a probe file, and check for free space."""
    probe = os.path.join(layout.tmp_dir, f"health.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"ok")
            if layout.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
        usage = os.statvfs(layout.root)
    except OSError as exc:
        raise fsio.unavailable("write a probe file in", layout.tmp_dir, exc) from exc
    if usage.f_bavail == 0:
        raise StorageUnavailable(f"filesystem store: no free space left under {layout.root}")
