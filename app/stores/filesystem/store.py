"""The embedded default store: uploads kept as files under one root directory.

Layout under ``root`` (the resolved ``storage.filesystem.root``)::

    root/<name>                             finished objects, renamed into place
    root/.uploads/sessions/<sha256>.json    one session record ("sidecar") per name
    root/.uploads/data/<session_id>         the bytes of an unfinished upload
    root/.uploads/callbacks/<sha256>.json   completion callbacks not yet delivered
    root/.uploads/locks/<sha256>.lock       per-name lock (``flock``) and writer token
    root/.uploads/tmp/                      temp files of atomic writes, health probes

Sidecars are named by the SHA-256 of the upload name because names may be
1024 bytes long and contain ``/``. The data file of an upload may hold bytes
past the sidecar's ``offset`` (a crash between writing data and recording it);
those were never acknowledged and are cut off before the next append or finish.

Durability (with ``filesystem.fsync``, the default): data is fsynced before the
sidecar offset that counts it is written, and sidecars are replaced atomically
(temp file, fsync, rename, fsync of the directory). A finished upload is marked
completed in its sidecar *before* its data file is renamed to ``root/<name>``,
so a crash in between is rolled forward by the next access instead of leaving
a session whose data has vanished.

ETag: an MD5 of the whole object cannot be computed across resumes, so the
ETag is the strong validator ``"<crc32c as 8 hex digits>-<size>"`` (quotes
included), which changes whenever the content does as far as CRC32C can tell.

Several processes may share a root. The caller serialises writers of one name
only within its own process, so every step that changes an upload (create, the
start of a write, each appended batch with its sidecar update, finish, cancel,
crash repairs) runs under an exclusive ``flock`` on the name's lock file, taken
in the worker thread for one short step and never held across an await. A
write also leaves a random token in the lock file when it starts; before each
later step it re-reads, under the lock, the sidecar and the token and goes on
only if the session, its offset (as this write last recorded it) and the token
are still its own and the data file is still the one it opened. Otherwise
another process replaced, advanced, took over, finished or cancelled the
upload meanwhile: the write drops what it still holds, changes nothing and
raises ``OffsetMismatch`` (``UploadNotFound`` when the session is gone), so a
stalled writer can never record over newer work or append to a finished
object. The token needs no durability: a crash ends every writer. Lock files
are removed, under their lock, together with their session; a waiter that then
finds its locked file unlinked simply opens the new one. (On NFS, Linux maps
``flock`` to POSIX locks, so the server must support locking.)

The store needs a POSIX system: paths under the root are walked with directory file
descriptors and ``O_NOFOLLOW`` so that a symlink planted under the root can
never redirect a write outside it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import ParamSpec, TypeVar

from app.config import StorageConfig
from app.core import rules
from app.core.digests import crc32c_extend
from app.core.model import PendingCallback, oldest_first
from app.core.protocol import RESERVED_PREFIX, is_id_session_name, validate_name
from app.errors import (
    InvalidName,
    OffsetMismatch,
    StorageUnavailable,
    TotalMismatch,
    UploadNotFound,
)
from app.stores.base import CompletedObject, UploadInfo

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
#: Chunks are gathered up to this size before one thread hop writes them, so
#: tiny chunks do not cost a thread switch each and big ones never block the loop.
_WRITE_BATCH = 4 * _MIB
#: A long request records its progress this often, so a crash mid-request
#: keeps most of what already reached the disk.
_CHECKPOINT_BYTES = 64 * _MIB
_READ_BLOCK = 4 * _MIB
_LIST_BATCH = 64
#: Temp files older than this are leftovers of a crash, not another instance's
#: write in progress.
_STALE_TMP_SECONDS = 3600.0
_SIDECAR_FORMAT = 1
#: Length of the random writer token kept at the start of a name's lock file.
_TOKEN_BYTES = 32

_P = ParamSpec("_P")
_T = TypeVar("_T")


async def _in_thread(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run blocking I/O in a worker thread and wait for it even if cancelled.

    Returning while the thread still runs would let the next request for the
    same upload truncate or append under it; so a cancellation is held back
    until the thread is done, then re-raised.
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        except BaseException:
            if cancelled:
                raise asyncio.CancelledError from None
            raise
        break
    if cancelled:
        raise asyncio.CancelledError
    return result


def _errno_text(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "error"
    return f"{code} ({exc.strerror or exc})"


def _unavailable(action: str, path: str, exc: OSError) -> StorageUnavailable:
    return StorageUnavailable(f"filesystem store: cannot {action} {path}: {_errno_text(exc)}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _name_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _etag(crc32c: int, size: int) -> str:
    return f'"{crc32c:08x}-{size}"'


def _stamp(info: UploadInfo) -> UploadInfo:
    """Attach the version token callers pass back for optimistic concurrency."""
    return replace(info, version=f"{info.session_id}:{info.offset}:{info.updated_at:.6f}")


def _encode_sidecar(info: UploadInfo) -> bytes:
    doc = {"format": _SIDECAR_FORMAT, **info.to_json()}
    # ASCII escapes keep any odd metadata text encodable.
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _decode_sidecar(raw: bytes, path: str) -> UploadInfo:
    try:
        return _stamp(UploadInfo.from_json(json.loads(raw)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageUnavailable(
            f"filesystem store: session record {path} is damaged ({exc!r})"
        ) from exc


@dataclass
class _Append:
    """One ``write`` in progress: the open data file and what has reached it."""

    #: Durable state as last recorded in the sidecar (plus a newly settled total).
    recorded: UploadInfo
    fd: int
    path: str
    #: This write's token in the lock file; another write starting replaces it.
    token: bytes
    #: The data file was created by this write, so its directory entry needs an fsync.
    created: bool
    offset: int
    crc32c: int
    #: Something not yet in the sidecar: new bytes or a newly settled total.
    dirty: bool
    #: A write to the data file failed; nothing more is appended in this call.
    failed: bool = False
    #: An fsync failed: the kernel may have dropped the dirty pages, and a later
    #: fsync can report success regardless, so nothing more may be recorded.
    broken: bool = False
    #: Another writer or process changed the upload: nothing more is written.
    stale: bool = False


class FilesystemStore:
    """Uploads as files under one root directory; see the module docstring."""

    def __init__(self, config: StorageConfig, root: str, name_max: int) -> None:
        self._config = config
        self._fsync = config.filesystem.fsync
        self._root = root
        self._name_max = name_max
        uploads = os.path.join(root, RESERVED_PREFIX)
        self._sessions_dir = os.path.join(uploads, "sessions")
        self._data_dir = os.path.join(uploads, "data")
        self._callbacks_dir = os.path.join(uploads, "callbacks")
        self._tmp_dir = os.path.join(uploads, "tmp")
        self._locks_dir = os.path.join(uploads, "locks")

    @classmethod
    async def open(cls, config: StorageConfig) -> FilesystemStore:
        root, name_max = await asyncio.to_thread(cls._prepare_root, config)
        return cls(config, root, name_max)

    @staticmethod
    def _prepare_root(config: StorageConfig) -> tuple[str, int]:
        configured = config.filesystem.root
        try:
            os.makedirs(configured, exist_ok=True)
            # The operator may point the root through a symlink; resolve it once
            # so every later containment check compares real paths.
            root = os.path.realpath(configured)
            uploads = os.path.join(root, RESERVED_PREFIX)
            for sub in ("sessions", "data", "callbacks", "tmp", "locks"):
                os.makedirs(os.path.join(uploads, sub), exist_ok=True)
            if config.filesystem.fsync:
                for path in (root, uploads):
                    _fsync_dir(path)
            try:
                name_max = os.pathconf(root, "PC_NAME_MAX")
            except (OSError, ValueError):
                name_max = 255
            _sweep_stale_tmp(os.path.join(uploads, "tmp"))
        except OSError as exc:
            raise _unavailable("prepare the storage root", configured, exc) from exc
        return root, name_max

    async def close(self) -> None:
        # Every operation finishes its own I/O before returning: nothing to release.
        return None

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
        self._check_session_name(name)
        if target is not None:
            self._check_name_text(target)
        part_size = rules.part_size_for_new(total, self._config.part_size)
        now = time.time()
        info = UploadInfo(
            name=name,
            session_id=uuid.uuid4().hex,
            offset=0,
            total=total,
            part_size=part_size,
            crc32c=0,
            content_type=content_type,
            metadata=dict(metadata),
            owner=owner,
            created_at=now,
            updated_at=now,
            target=target,
        )
        return await _in_thread(self._create, info)

    async def get(self, name: str) -> UploadInfo:
        self._check_session_name(name)
        return await _in_thread(self._load, name)

    async def write(
        self,
        info: UploadInfo,
        chunks: AsyncIterable[bytes],
        *,
        total: int | None = None,
    ) -> UploadInfo:
        self._check_session_name(info.name)
        append = await _in_thread(self._begin_write, info, total)
        limit = append.recorded.total
        pending: list[bytes] = []
        pending_size = 0
        failure: BaseException | None = None
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                # A copy, because google_crc32c takes only bytes and the caller
                # may reuse its buffer while this one waits for a batch.
                data = bytes(chunk)
                if limit is not None and append.offset + pending_size + len(data) > limit:
                    # Keep what fits, refuse the rest: bytes past the total would
                    # make the object something the client never declared.
                    data = data[: limit - append.offset - pending_size]
                    failure = TotalMismatch(
                        f"more bytes than the declared total of {limit} for {info.name!r}"
                    )
                pending.append(data)
                pending_size += len(data)
                if failure is not None:
                    break
                if pending_size >= _WRITE_BATCH:
                    batch, pending, pending_size = pending, [], 0
                    await _in_thread(self._append, append, batch)
        except BaseException as exc:  # a client gone mid-body still keeps what arrived
            failure = exc
        if failure is not None:
            closer = getattr(chunks, "aclose", None)
            if closer is not None and not isinstance(failure, asyncio.CancelledError):
                try:
                    await closer()
                except Exception:
                    log.debug("closing the chunk stream failed", exc_info=True)
        try:
            result = await _in_thread(self._end_write, append, pending)
        except Exception:
            if isinstance(failure, asyncio.CancelledError):
                raise failure from None  # a cancellation is never swallowed
            raise
        if failure is not None:
            raise failure
        return result

    async def finish(self, info: UploadInfo, *, md5: bytes | None = None) -> UploadInfo:
        self._check_session_name(info.name)
        return await _in_thread(self._finish, info, md5)

    async def cancel(self, name: str, *, session_id: str | None = None) -> None:
        self._check_session_name(name)
        await _in_thread(self._cancel, name, session_id)

    def list_unfinished(self) -> AsyncIterator[UploadInfo]:
        return self._list_sessions(completed=False)

    def list_completed(self) -> AsyncIterator[UploadInfo]:
        return self._list_sessions(completed=True)

    async def _list_sessions(self, *, completed: bool) -> AsyncIterator[UploadInfo]:
        files = await _in_thread(self._list_dir, self._sessions_dir, ".json")
        for start in range(0, len(files), _LIST_BATCH):
            infos = await _in_thread(self._read_sidecars, files[start : start + _LIST_BATCH])
            for info in infos:
                if info.is_complete == completed:
                    yield info

    # -- HealthCheck ---------------------------------------------------------

    async def check_health(self) -> None:
        await _in_thread(self._check_health)

    # -- CallbackOutbox ------------------------------------------------------

    async def save_pending(self, callback_id: str, payload: bytes) -> None:
        raw = PendingCallback(callback_id, bytes(payload), time.time()).to_json()
        path = self._callback_path(callback_id)
        await _in_thread(self._atomic_write, path, raw, "save the pending callback")

    async def delete_pending(self, callback_id: str) -> None:
        await _in_thread(self._remove, self._callback_path(callback_id), "delete the callback")

    async def list_pending(self) -> list[tuple[str, bytes]]:
        return await _in_thread(self._list_callbacks)

    # -- names and paths -----------------------------------------------------

    def _check_session_name(self, name: str) -> None:
        """A session's name is an object name, or an id session's own name
        (hashed into its sidecar's file name, so never a path)."""
        if not is_id_session_name(name):
            self._check_name_text(name)

    def _check_name_text(self, name: str) -> None:
        """Checks that need no disk access; the protocol rules apply here too
        because the store must stay safe even if a caller forgot them."""
        validate_name(name)
        segments = name.split("/")
        # Case-insensitive filesystems would map '.UPLOADS' onto the reserved tree.
        if segments[0].casefold() == RESERVED_PREFIX.casefold():
            raise InvalidName(f"names under '{RESERVED_PREFIX}/' are reserved for the service")
        for segment in segments:
            if len(segment.encode("utf-8", "surrogatepass")) > self._name_max:
                raise InvalidName(
                    f"the name segment {segment[:40]!r}... is longer than the "
                    f"{self._name_max} bytes this filesystem allows"
                )
        target = os.path.normpath(os.path.join(self._root, name))
        if not target.startswith(self._root + os.sep):
            raise InvalidName(f"the upload name {name!r} leads outside the storage root")

    def _check_name(self, name: str) -> None:
        """Refuse early a name whose object could never be placed, so a client
        does not upload gigabytes only to be refused at the end."""
        self._check_name_text(name)
        try:
            walked = self._walk_to_parent(name, create=False)
        except OSError as exc:
            raise _unavailable("check the destination of", self._object_path(name), exc) from exc
        if walked is not None:
            dir_fd, leaf = walked
            try:
                self._check_leaf(dir_fd, name, leaf)
            finally:
                os.close(dir_fd)

    def _object_path(self, name: str) -> str:
        return os.path.join(self._root, name)

    def _sidecar_path(self, name: str) -> str:
        return os.path.join(self._sessions_dir, _name_key(name) + ".json")

    def _data_path(self, session_id: str) -> str:
        return os.path.join(self._data_dir, session_id)

    def _lock_path(self, name: str) -> str:
        return os.path.join(self._locks_dir, _name_key(name) + ".lock")

    def _callback_path(self, callback_id: str) -> str:
        return os.path.join(self._callbacks_dir, _name_key(callback_id) + ".json")

    def _walk_to_parent(self, name: str, *, create: bool) -> tuple[int, str] | None:
        """Open the directory that will hold ``name`` without following symlinks.

        Returns an open directory fd and the last segment, or None when
        ``create`` is false and a directory on the way does not exist yet.
        """
        segments = name.split("/")
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for depth, segment in enumerate(segments[:-1], start=1):
                shown = "/".join(segments[:depth])
                made = False
                try:
                    st = os.stat(segment, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    try:
                        os.mkdir(segment, 0o755, dir_fd=fd)
                        made = True
                    except FileExistsError:
                        pass  # another upload made it meanwhile; checked below
                    st = os.stat(segment, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise InvalidName(
                        f"'{shown}' under the storage root is a symbolic link; "
                        f"refusing to place {name!r} through it"
                    )
                if not stat.S_ISDIR(st.st_mode):
                    raise InvalidName(
                        f"'{shown}' already exists as a file, so {name!r} cannot be "
                        "stored below it"
                    )
                try:
                    # O_NOFOLLOW closes the gap between the check above and this open.
                    child = os.open(
                        segment,
                        os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=fd,
                    )
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise InvalidName(
                            f"'{shown}' under the storage root is not a plain directory"
                        ) from exc
                    raise
                if made and self._fsync:
                    os.fsync(fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, segments[-1]

    def _check_leaf(self, dir_fd: int, name: str, leaf: str) -> None:
        try:
            st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _unavailable("inspect", self._object_path(name), exc) from exc
        if stat.S_ISDIR(st.st_mode):
            raise InvalidName(
                f"a directory exists at {name!r}; an object cannot replace it"
            )
        if stat.S_ISLNK(st.st_mode):
            raise InvalidName(f"{name!r} under the storage root is a symbolic link; refusing it")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidName(f"{name!r} under the storage root is not a regular file")

    # -- blocking helpers (run in worker threads) ----------------------------

    @contextmanager
    def _locked(self, name: str) -> Iterator[int]:
        """Hold the exclusive cross-process lock of ``name`` for one short step.

        Yields the lock file's descriptor (it also carries the writer token).
        Never nest: a second lock of the same name in one thread would wait for
        itself. A lock file whose session is gone is removed before unlocking.
        """
        path = self._lock_path(name)
        fd = self._acquire_lock(path)
        try:
            yield fd
        finally:
            try:
                if not os.path.lexists(self._sidecar_path(name)):
                    # Still locked: a waiter on this file sees it unlinked and retries.
                    os.unlink(path)
            except OSError:
                pass  # a leftover lock file costs nothing
            os.close(fd)  # releases the lock

    def _acquire_lock(self, path: str) -> int:
        while True:
            try:
                fd = os.open(
                    path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
                )
            except OSError as exc:
                raise _unavailable("open the lock file", path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = os.fstat(fd)
                try:
                    current = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
            except OSError as exc:
                os.close(fd)
                raise _unavailable("lock", path, exc) from exc
            except BaseException:
                os.close(fd)
                raise
            if current is not None and (current.st_dev, current.st_ino) == (
                held.st_dev,
                held.st_ino,
            ):
                return fd
            os.close(fd)  # removed (or replaced) while we waited: lock the current one

    def _atomic_write(self, path: str, raw: bytes, action: str) -> None:
        tmp = os.path.join(self._tmp_dir, f"{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, raw)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self._fsync:
                _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _unavailable(action, path, exc) from exc

    def _remove(self, path: str, action: str) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _unavailable(action, path, exc) from exc
        if self._fsync:
            try:
                _fsync_dir(os.path.dirname(path))
            except OSError as exc:
                raise _unavailable(action, path, exc) from exc
        return True

    def _write_sidecar(self, info: UploadInfo) -> None:
        self._atomic_write(
            self._sidecar_path(info.name), _encode_sidecar(info), "save the session record"
        )

    def _read_sidecar(self, name: str, *, discard_damaged: bool = False) -> UploadInfo | None:
        """The recorded session of ``name``, or None. A damaged record is an
        error, except to ``create``/``cancel`` (``discard_damaged``), which
        would otherwise be blocked by it forever."""
        path = self._sidecar_path(name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unavailable("read the session record", path, exc) from exc
        try:
            return _decode_sidecar(raw, path)
        except StorageUnavailable as exc:
            if not discard_damaged:
                raise
            log.warning("discarding a session record: %s", exc.message)
            self._remove(path, "remove the damaged session record")
            return None

    def _load(self, name: str) -> UploadInfo:
        """The session of ``name``, after repairing what a crash left behind.

        Reading needs no lock; a repair is decided again under the lock, since
        what looked broken may be another process's step in progress.
        """
        info = self._read_sidecar(name)
        if info is None:
            raise UploadNotFound(f"no upload in progress for {name!r}")
        if self._data_size_if_broken(info) is None:
            return info
        with self._locked(name):
            return self._load_locked(name)

    def _load_locked(self, name: str) -> UploadInfo:
        """``_load`` for a caller that holds the lock of ``name``."""
        info = self._read_sidecar(name)
        if info is None:
            raise UploadNotFound(f"no upload in progress for {name!r}")
        size = self._data_size_if_broken(info)
        if size is None:
            return info
        data_path = self._data_path(info.session_id)
        if info.completed is not None:
            # Marked completed, then a crash before the rename: finish the job.
            self._place(info.object_name, data_path)
            return info
        return self._repair_short_data(info, data_path)

    def _data_size_if_broken(self, info: UploadInfo) -> int | None:
        """The data file's size (0 if missing) when it disagrees with the
        sidecar in a way a crash leaves behind, else None."""
        data_path = self._data_path(info.session_id)
        try:
            size: int | None = os.stat(data_path).st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:
            raise _unavailable("inspect", data_path, exc) from exc
        if info.completed is not None:
            return size  # a completed session's data file is renamed away
        if (size or 0) < info.offset:
            return size or 0
        return None

    def _repair_short_data(self, info: UploadInfo, data_path: str) -> UploadInfo:
        """The data file lost bytes the sidecar counts (fsync off, or a damaged
        disk): report only what is really there rather than invent bytes."""
        crc = 0
        size = 0
        try:
            with open(data_path, "rb") as f:
                while size < info.offset:
                    block = f.read(min(_READ_BLOCK, info.offset - size))
                    if not block:
                        break
                    crc = crc32c_extend(crc, block)
                    size += len(block)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _unavailable("read", data_path, exc) from exc
        log.warning(
            "upload %r: data file holds %d bytes but the session counted %d; "
            "continuing from %d", info.name, size, info.offset, size,
        )
        repaired = _stamp(replace(info, offset=size, crc32c=crc, updated_at=time.time()))
        self._write_sidecar(repaired)
        return repaired

    def _create(self, info: UploadInfo) -> UploadInfo:
        self._check_name(info.object_name)
        with self._locked(info.name):
            return self._create_locked(info)

    def _create_locked(self, info: UploadInfo) -> UploadInfo:
        old = self._read_sidecar(info.name, discard_damaged=True)
        if old is not None:
            old_data = self._data_path(old.session_id)
            if old.completed is not None:
                if os.path.exists(old_data):
                    self._place(old.object_name, old_data)
            else:
                # Data before sidecar: a crash in between leaves a session that
                # repairs to offset 0, never an orphaned data file.
                self._remove(old_data, "discard the replaced upload")
        stamped = _stamp(info)
        self._write_sidecar(stamped)
        return stamped

    def _begin_write(self, info: UploadInfo, total: int | None) -> _Append:
        with self._locked(info.name) as lock_fd:
            return self._begin_write_locked(info, total, lock_fd)

    def _begin_write_locked(self, info: UploadInfo, total: int | None, lock_fd: int) -> _Append:
        stored = self._load_locked(info.name)
        total = rules.check_write(stored, info, total)
        dirty = total != stored.total
        if dirty:
            stored = replace(stored, total=total)
        path = self._data_path(stored.session_id)
        try:
            created = not os.path.exists(path)
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
            )
        except OSError as exc:
            raise _unavailable("open", path, exc) from exc
        try:
            # Bytes past the recorded offset were never acknowledged.
            if os.fstat(fd).st_size != stored.offset:
                os.ftruncate(fd, stored.offset)
            os.lseek(fd, stored.offset, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise _unavailable("prepare", path, exc) from exc
        # Take over: a writer still streaming elsewhere (a stalled request on
        # another process) sees its token gone at its next step and stops.
        token = uuid.uuid4().hex.encode("ascii")
        try:
            os.pwrite(lock_fd, token, 0)
        except OSError as exc:
            os.close(fd)
            raise _unavailable("write the lock file", self._lock_path(info.name), exc) from exc
        return _Append(
            recorded=stored,
            fd=fd,
            path=path,
            token=token,
            created=created,
            offset=stored.offset,
            crc32c=stored.crc32c,
            dirty=dirty,
        )

    def _check_still_ours(self, append: _Append, lock_fd: int) -> None:
        """Under the lock: refuse to go on unless nothing else touched the
        upload since this write started or last recorded."""
        name = append.recorded.name
        try:
            token = os.pread(lock_fd, _TOKEN_BYTES, 0)
        except OSError as exc:
            raise _unavailable("read the lock file", self._lock_path(name), exc) from exc
        stored = self._read_sidecar(name)
        if stored is None:
            append.stale = True
            raise UploadNotFound(f"the upload {name!r} was cancelled meanwhile")
        if stored.session_id != append.recorded.session_id:
            reason = "was replaced by a new upload"
        elif stored.completed is not None:
            reason = "was completed by another request"
        elif stored.offset != append.recorded.offset or token != append.token:
            reason = "is being written by another request"
        else:
            try:
                held = os.fstat(append.fd)
                current = os.stat(append.path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            except OSError as exc:
                raise _unavailable("inspect", append.path, exc) from exc
            if current is not None and (current.st_dev, current.st_ino) == (
                held.st_dev,
                held.st_ino,
            ):
                return
            reason = "lost the data file this write opened"
        append.stale = True
        raise OffsetMismatch(
            f"{name!r} {reason}; it holds {stored.offset} bytes", offset=stored.offset
        )

    def _append(self, append: _Append, batch: list[bytes]) -> None:
        with self._locked(append.recorded.name) as lock_fd:
            self._check_still_ours(append, lock_fd)
            self._append_locked(append, batch)

    def _append_locked(self, append: _Append, batch: list[bytes]) -> None:
        data = b"".join(batch)
        try:
            _write_all(append.fd, data)
        except OSError as exc:
            # Whatever part of the batch reached the file is not counted, and is
            # cut off by the next write.
            append.failed = True
            raise _unavailable("write", append.path, exc) from exc
        append.crc32c = crc32c_extend(append.crc32c, data)
        append.offset += len(data)
        append.dirty = True
        if append.offset - append.recorded.offset >= _CHECKPOINT_BYTES:
            self._record(append)

    def _record(self, append: _Append) -> UploadInfo:
        """Make the appended bytes durable, then count them in the sidecar.
        The caller holds the lock and has checked the upload is still its own."""
        if self._fsync:
            try:
                os.fsync(append.fd)
                if append.created:
                    _fsync_dir(self._data_dir)
            except OSError as exc:
                append.failed = append.broken = True
                raise _unavailable("flush", append.path, exc) from exc
            append.created = False
        recorded = _stamp(
            replace(
                append.recorded,
                offset=append.offset,
                crc32c=append.crc32c,
                updated_at=time.time(),
            )
        )
        self._write_sidecar(recorded)
        append.recorded = recorded
        append.dirty = False
        return recorded

    def _end_write(self, append: _Append, batch: list[bytes]) -> UploadInfo:
        error: StorageUnavailable | None = None
        try:
            write = bool(batch) and not append.failed
            if append.stale or not (write or (append.dirty and not append.broken)):
                return append.recorded  # nothing to write, or no longer ours to write
            with self._locked(append.recorded.name) as lock_fd:
                self._check_still_ours(append, lock_fd)
                if write:
                    try:
                        self._append_locked(append, batch)
                    except StorageUnavailable as exc:
                        error = exc  # still record the bytes that did get written
                if append.dirty and not append.broken:
                    result = self._record(append)
                else:
                    result = append.recorded
        finally:
            try:
                os.close(append.fd)
            except OSError:
                pass
        if error is not None:
            raise error
        return result

    def _finish(self, info: UploadInfo, md5: bytes | None) -> UploadInfo:
        with self._locked(info.name):
            return self._finish_locked(info, md5)

    def _finish_locked(self, info: UploadInfo, md5: bytes | None) -> UploadInfo:
        stored = self._load_locked(info.name)
        if rules.check_finish(stored, info):
            return stored
        data_path = self._data_path(stored.session_id)
        self._seal_data(data_path, stored.offset)
        target = stored.object_name
        try:
            walked = self._walk_to_parent(target, create=True)
        except OSError as exc:
            raise _unavailable(
                "create the directories of", self._object_path(target), exc
            ) from exc
        assert walked is not None  # create=True always yields a directory
        dir_fd, leaf = walked
        try:
            self._check_leaf(dir_fd, target, leaf)
            now = time.time()
            done = _stamp(
                replace(
                    stored,
                    updated_at=now,
                    completed=CompletedObject(
                        key=target,
                        bucket=self._root,
                        size=stored.offset,
                        etag=_etag(stored.crc32c, stored.offset),
                        crc32c=stored.crc32c,
                        completed_at=now,
                        md5=md5,
                    ),
                )
            )
            self._write_sidecar(done)
            try:
                self._rename_into(dir_fd, target, leaf, data_path)
            except BaseException:
                # Without the rename the object does not exist: undo the mark so
                # the upload can be finished again.
                try:
                    self._write_sidecar(stored)
                except StorageUnavailable:
                    log.exception("could not restore the session of %r", info.name)
                raise
        finally:
            os.close(dir_fd)
        return done

    def _seal_data(self, data_path: str, size: int) -> None:
        """Make the data file exactly ``size`` durable bytes before it becomes the object."""
        try:
            fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if self._fsync:
                _fsync_dir(self._data_dir)
        except OSError as exc:
            raise _unavailable("flush", data_path, exc) from exc

    def _place(self, name: str, data_path: str) -> None:
        try:
            walked = self._walk_to_parent(name, create=True)
        except OSError as exc:
            raise _unavailable("create the directories of", self._object_path(name), exc) from exc
        assert walked is not None
        dir_fd, leaf = walked
        try:
            self._check_leaf(dir_fd, name, leaf)
            self._rename_into(dir_fd, name, leaf, data_path)
        finally:
            os.close(dir_fd)

    def _rename_into(self, dir_fd: int, name: str, leaf: str, data_path: str) -> None:
        try:
            os.replace(data_path, leaf, dst_dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENOTEMPTY):
                raise InvalidName(
                    f"{name!r} cannot be placed: something that is not a file is in the way"
                ) from exc
            raise _unavailable("move the finished upload to", self._object_path(name), exc) from exc
        if self._fsync:
            try:
                os.fsync(dir_fd)
                _fsync_dir(self._data_dir)
            except OSError as exc:
                raise _unavailable("flush the directory of", self._object_path(name), exc) from exc

    def _cancel(self, name: str, session_id: str | None = None) -> None:
        with self._locked(name):
            self._cancel_locked(name, session_id)

    def _cancel_locked(self, name: str, session_id: str | None = None) -> None:
        existed = os.path.exists(self._sidecar_path(name))
        info = self._read_sidecar(name, discard_damaged=True)
        if info is None:
            if existed:
                return  # it was damaged, and is gone now
            raise UploadNotFound(f"no upload in progress for {name!r}")
        rules.check_cancel(info, session_id)
        data_path = self._data_path(info.session_id)
        if info.completed is not None:
            if os.path.exists(data_path):
                self._place(info.object_name, data_path)  # it was acknowledged as finished
        else:
            # Data first: a crash in between leaves a session that repairs to
            # offset 0, never an orphaned data file nobody would clean up.
            self._remove(data_path, "discard the data of")
        self._remove(self._sidecar_path(name), "remove the session record")

    def _list_dir(self, directory: str, suffix: str) -> list[str]:
        try:
            return [
                os.path.join(directory, entry)
                for entry in os.listdir(directory)
                if entry.endswith(suffix)
            ]
        except OSError as exc:
            raise _unavailable("list", directory, exc) from exc

    def _read_sidecars(self, paths: list[str]) -> list[UploadInfo]:
        infos = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    infos.append(_decode_sidecar(f.read(), path))
            except FileNotFoundError:
                continue  # finished or cancelled while listing
            except OSError as exc:
                raise _unavailable("read the session record", path, exc) from exc
            except StorageUnavailable as exc:
                log.warning("skipping a session record: %s", exc.message)
        return infos

    def _check_health(self) -> None:
        probe = os.path.join(self._tmp_dir, f"health.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"ok")
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
            usage = os.statvfs(self._root)
        except OSError as exc:
            raise _unavailable("write a probe file in", self._tmp_dir, exc) from exc
        if usage.f_bavail == 0:
            raise StorageUnavailable(f"filesystem store: no free space left under {self._root}")

    def _list_callbacks(self) -> list[tuple[str, bytes]]:
        found: list[PendingCallback] = []
        for path in self._list_dir(self._callbacks_dir, ".json"):
            try:
                with open(path, "rb") as f:
                    found.append(PendingCallback.from_json(f.read()))
            except FileNotFoundError:
                continue  # delivered while listing
            except OSError as exc:
                raise _unavailable("read the pending callback", path, exc) from exc
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping damaged callback record %s: %r", path, exc)
        return oldest_first(found)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep_stale_tmp(tmp_dir: str) -> None:
    cutoff = time.time() - _STALE_TMP_SECONDS
    for entry in os.scandir(tmp_dir):
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:
            pass  # another instance swept it first
