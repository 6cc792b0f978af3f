"""Blocking file I/O for the filesystem store, and its one error boundary.

Every ``OSError`` becomes ``StorageUnavailable`` here or in the caller that
knows what it was doing (``unavailable``), so nothing above the store sees an
OS exception. Everything blocking runs through ``in_thread``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from app.errors import StorageUnavailable
from app.stores.settle import settled

#: Temp files older than this are leftovers of a crash, not another instance's
#: write in progress.
STALE_TMP_SECONDS = 3600.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


async def in_thread(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run blocking I/O in a worker thread and wait for it even if cancelled.

    Returning while the thread still runs would let the next request for the
    same upload truncate or append under it; so a cancellation is held back
    until the thread is done, then re-raised.
    """
    return await settled(asyncio.to_thread(fn, *args, **kwargs))


def errno_text(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "error"
    return f"{code} ({exc.strerror or exc})"


def unavailable(action: str, path: str, exc: OSError) -> StorageUnavailable:
    return StorageUnavailable(f"filesystem store: cannot {action} {path}: {errno_text(exc)}")


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``; the one place bytes reach a file (tests inject
    failing writes here)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def name_key(text: str) -> str:
    """A fixed-length file name for any text (names may be 1024 bytes and hold '/')."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(tmp_dir: str, path: str, raw: bytes, action: str, *, fsync: bool) -> None:
    """Replace ``path`` with ``raw`` so a reader sees the old or the new bytes, never a mix."""
    tmp = os.path.join(tmp_dir, f"{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, raw)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(os.path.dirname(path))
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise unavailable(action, path, exc) from exc


def remove(path: str, action: str, *, fsync: bool) -> bool:
    """Unlink ``path``; False if it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise unavailable(action, path, exc) from exc
    if fsync:
        try:
            fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise unavailable(action, path, exc) from exc
    return True


def list_dir(directory: str, suffix: str) -> list[str]:
    try:
        return [
            os.path.join(directory, entry)
            for entry in os.listdir(directory)
            if entry.endswith(suffix)
        ]
    except OSError as exc:
        raise unavailable("list", directory, exc) from exc


def sweep_stale_tmp(tmp_dir: str) -> None:
    cutoff = time.time() - STALE_TMP_SECONDS
    for entry in os.scandir(tmp_dir):
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:
            pass  # another instance swept it first
