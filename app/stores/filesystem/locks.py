"""The per-name cross-process lock (``flock``) and the writer token in it.

Every step that changes an upload runs under an exclusive ``flock`` on the
name's lock file, taken in a worker thread for one short step and never held
across an await. A write leaves a random token at the start of the lock file
when it begins; a later write replacing it is how a stalled writer in another
process learns, at its next step, that it was taken over. The token needs no
durability: a crash ends every writer.

Lock files are removed, under their lock, together with their session; a
waiter that then finds its locked file unlinked simply opens the new one. (On
NFS, Linux maps ``flock`` to POSIX locks, so the server must support locking.)
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from app.stores.filesystem import fsio
from app.stores.filesystem.paths import Layout

#: Length of the random writer token kept at the start of a name's lock file.
TOKEN_BYTES = 32


@contextmanager
def locked(layout: Layout, name: str) -> Iterator[int]:
    """Hold the exclusive cross-process lock of ``name`` for one short step.

    Yields the lock file's descriptor (it also carries the writer token).
    Never nest: a second lock of the same name in one thread would wait for
    itself. A lock file whose session is gone is removed before unlocking.
    """
    path = layout.lock_path(name)
    fd = _acquire(path)
    try:
        yield fd
    finally:
        try:
            if not os.path.lexists(layout.sidecar_path(name)):
                # Still locked: a waiter on this file sees it unlinked and retries.
                os.unlink(path)
        except OSError:
            pass  # a leftover lock file costs nothing
        os.close(fd)  # releases the lock


def _acquire(path: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise fsio.unavailable("open the lock file", path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
        except OSError as exc:
            os.close(fd)
            raise fsio.unavailable("lock", path, exc) from exc
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (
            held.st_dev,
            held.st_ino,
        ):
            return fd
        os.close(fd)  # removed (or replaced) while we waited: lock the current one


def claim(layout: Layout, name: str, lock_fd: int) -> bytes:
    """Under the lock: become the writer of ``name``; returns this writer's token."""
    token = uuid.uuid4().hex.encode("ascii")
    try:
        os.pwrite(lock_fd, token, 0)
    except OSError as exc:
        raise fsio.unavailable("write the lock file", layout.lock_path(name), exc) from exc
    return token


def current_token(layout: Layout, name: str, lock_fd: int) -> bytes:
    """Under the lock: the token of the writer that claimed ``name`` last."""
    try:
        return os.pread(lock_fd, TOKEN_BYTES, 0)
    except OSError as exc:
        raise fsio.unavailable("read the lock file", layout.lock_path(name), exc) from exc
