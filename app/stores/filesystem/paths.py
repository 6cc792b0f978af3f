"""Where things live under the root, and walking there safely.

Paths under the root are walked with directory file descriptors and
``O_NOFOLLOW``, so a symlink planted under the root can never redirect a
write outside it. Names are checked twice: as text (no disk access) before any
work, and against the disk before a client sends gigabytes for an object that
could never be placed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field

from app.config import StorageConfig
from app.core.protocol import RESERVED_PREFIX, is_id_session_name, validate_name
from app.errors import InvalidName, StorageUnavailable
from app.stores.filesystem import fsio

log = logging.getLogger(__name__)

_SUBDIRS = ("sessions", "data", "callbacks", "tmp", "locks", "owners")


@dataclass(frozen=True)
class Layout:
    """The store's directories under one resolved root, and its fsync policy."""

    root: str
    #: Longest name segment the filesystem allows (``PC_NAME_MAX``).
    name_max: int
    fsync: bool
    #: (path, st_dev, st_ino) of the root and each of the store's own folders,
    #: captured at start-up: ``check_folders`` compares them before each
    #: operation, so a folder swapped for a symlink (or another directory)
    #: afterwards is refused instead of followed.
    folders: tuple[tuple[str, int, int], ...] = field(default=(), compare=False)

    @property
    def uploads_dir(self) -> str:
        return os.path.join(self.root, RESERVED_PREFIX)

    @property
    def sessions_dir(self) -> str:
        return os.path.join(self.uploads_dir, "sessions")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.uploads_dir, "data")

    @property
    def callbacks_dir(self) -> str:
        return os.path.join(self.uploads_dir, "callbacks")

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.uploads_dir, "tmp")

    @property
    def locks_dir(self) -> str:
        return os.path.join(self.uploads_dir, "locks")

    def object_path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def sidecar_path(self, name: str) -> str:
        return os.path.join(self.sessions_dir, fsio.name_key(name) + ".json")

    def data_path(self, session_id: str) -> str:
        return os.path.join(self.data_dir, session_id)

    def lock_path(self, name: str) -> str:
        return os.path.join(self.locks_dir, fsio.name_key(name) + ".lock")

    def owner_path(self, name: str) -> str:
        return os.path.join(self.uploads_dir, "owners", fsio.name_key(name) + ".json")

    def callback_path(self, callback_id: str) -> str:
        return os.path.join(self.callbacks_dir, fsio.name_key(callback_id) + ".json")


def prepare_root(config: StorageConfig) -> Layout:
    """Create the directory tree (blocking) and return its layout."""
    configured = config.filesystem.root
    fsync = config.filesystem.fsync
    try:
        os.makedirs(configured, exist_ok=True)
        # The operator may point the root through a symlink; resolve it once
        # so every later containment check compares real paths.
        root = os.path.realpath(configured)
        uploads = os.path.join(root, RESERVED_PREFIX)
        for path in _own_folders(root)[1:]:
            if os.path.islink(path):
                # Checked before makedirs, which would accept a link to a directory.
                _require_plain_dir(root, path, os.lstat(path))
            os.makedirs(path, exist_ok=True)
        if fsync:
            for path in (root, uploads):
                fsio.fsync_dir(path)
        try:
            name_max = os.pathconf(root, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        folders = _capture_folders(root)
        fsio.sweep_stale_tmp(os.path.join(uploads, "tmp"))
    except OSError as exc:
        raise fsio.unavailable("prepare the storage root", configured, exc) from exc
    return Layout(root=root, name_max=name_max, fsync=fsync, folders=folders)


def _own_folders(root: str) -> list[str]:
    uploads = os.path.join(root, RESERVED_PREFIX)
    return [root, uploads, *(os.path.join(uploads, sub) for sub in _SUBDIRS)]


def _capture_folders(root: str) -> tuple[tuple[str, int, int], ...]:
    """Identities of the store's own folders; refuses any that is a symlink.

    Only the last component of a path under them is opened with
    ``O_NOFOLLOW``, so a symlink as ``.uploads/data`` would send every
    upload's bytes wherever it points."""
    found = []
    for path in _own_folders(root):
        st = os.lstat(path)
        _require_plain_dir(root, path, st)
        found.append((path, st.st_dev, st.st_ino))
    return tuple(found)


def _require_plain_dir(root: str, path: str, st: os.stat_result) -> None:
    shown = os.path.relpath(path, root) if path != root else root
    if stat.S_ISLNK(st.st_mode):
        raise StorageUnavailable(
            f"filesystem store: {shown!r} under {root} is a symbolic link; the store's own "
            "folders must be plain directories inside the root (remove the link)"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise StorageUnavailable(f"filesystem store: cannot use {path}: ENOTDIR (not a directory)")


def check_folders(layout: Layout) -> None:
    """Refuse to work if a folder of the store is no longer the one found at
    start-up (a symlink or another directory planted since). One ``lstat``
    per folder: cheap enough to run before every operation."""
    try:
        for path, dev, ino in layout.folders:
            try:
                st = os.lstat(path)
            except OSError as exc:
                raise fsio.unavailable("check the store folder", path, exc) from exc
            _require_plain_dir(layout.root, path, st)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise StorageUnavailable(
                    f"filesystem store: {path} was replaced since start-up; refusing to "
                    "read or write through it (restart the service once the root is sound)"
                )
    except StorageUnavailable as exc:
        # The client sees only a 503: the operator needs the reason.
        log.error("%s", exc.message)
        raise


def check_name_text(layout: Layout, name: str) -> None:
    """Checks that need no disk access; the protocol rules apply here too
    because the store must stay safe even if a caller forgot them."""
    validate_name(name)
    segments = name.split("/")
    # Case-insensitive filesystems would map '.UPLOADS' onto the reserved tree.
    if segments[0].casefold() == RESERVED_PREFIX.casefold():
        raise InvalidName(f"names under '{RESERVED_PREFIX}/' are reserved for the service")
    for segment in segments:
        if len(segment.encode("utf-8", "surrogatepass")) > layout.name_max:
            raise InvalidName(
                f"the name segment {segment[:40]!r}... is longer than the "
                f"{layout.name_max} bytes this filesystem allows"
            )
    target = os.path.normpath(os.path.join(layout.root, name))
    if not target.startswith(layout.root + os.sep):
        raise InvalidName(f"the upload name {name!r} leads outside the storage root")


def check_session_name(layout: Layout, name: str) -> None:
    """A session's name is an object name, or an id session's own name
    (hashed into its sidecar's file name, so never a path)."""
    if not is_id_session_name(name):
        check_name_text(layout, name)


def check_destination(layout: Layout, name: str) -> None:
    """Refuse early a name whose object could never be placed, so a client
    does not upload gigabytes only to be refused at the end."""
    check_name_text(layout, name)
    try:
        walked = walk_to_parent(layout, name, create=False)
    except OSError as exc:
        raise fsio.unavailable(
            "check the destination of", layout.object_path(name), exc
        ) from exc
    if walked is not None:
        dir_fd, leaf = walked
        try:
            check_leaf(layout, dir_fd, name, leaf)
        finally:
            os.close(dir_fd)


def walk_to_parent(layout: Layout, name: str, *, create: bool) -> tuple[int, str] | None:
    """Open the directory that will hold ``name`` without following symlinks.

    Returns an open directory fd and the last segment, or None when ``create``
    is false and a directory on the way does not exist yet.
    """
    segments = name.split("/")
    fd = os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, segment in enumerate(segments[:-1], start=1):
            child = _step_down(layout, fd, segment, "/".join(segments[:depth]), name, create)
            os.close(fd)
            if child is None:
                return None
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, segments[-1]


def _step_down(
    layout: Layout, fd: int, segment: str, shown: str, name: str, create: bool
) -> int | None:
    """Open the directory ``segment`` below ``fd`` (made if ``create``), or None."""
    made = False
    try:
        st = os.stat(segment, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        if not create:
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
            f"'{shown}' already exists as a file, so {name!r} cannot be stored below it"
        )
    try:
        # O_NOFOLLOW closes the gap between the check above and this open.
        child = os.open(
            segment, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
        )
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InvalidName(
                f"'{shown}' under the storage root is not a plain directory"
            ) from exc
        raise
    if made and layout.fsync:
        try:
            os.fsync(fd)
        except BaseException:
            os.close(child)
            raise
    return child


def check_leaf(layout: Layout, dir_fd: int, name: str, leaf: str) -> None:
    try:
        st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise fsio.unavailable("inspect", layout.object_path(name), exc) from exc
    if stat.S_ISDIR(st.st_mode):
        raise InvalidName(f"a directory exists at {name!r}; an object cannot replace it")
    if stat.S_ISLNK(st.st_mode):
        raise InvalidName(f"{name!r} under the storage root is a symbolic link; refusing it")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidName(f"{name!r} under the storage root is not a regular file")


def open_destination(layout: Layout, name: str) -> tuple[int, str]:
    """The directory fd (made as needed) and leaf where the object ``name`` goes."""
    try:
        walked = walk_to_parent(layout, name, create=True)
    except OSError as exc:
        raise fsio.unavailable(
            "create the directories of", layout.object_path(name), exc
        ) from exc
    assert walked is not None  # create=True always yields a directory
    dir_fd, leaf = walked
    try:
        check_leaf(layout, dir_fd, name, leaf)
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd, leaf


def rename_into(layout: Layout, dir_fd: int, name: str, leaf: str, data_path: str) -> None:
    """Move a sealed data file to ``name`` and make the move durable."""
    try:
        os.replace(data_path, leaf, dst_dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENOTEMPTY):
            raise InvalidName(
                f"{name!r} cannot be placed: something that is not a file is in the way"
            ) from exc
        raise fsio.unavailable(
            "move the finished upload to", layout.object_path(name), exc
        ) from exc
    if layout.fsync:
        try:
            os.fsync(dir_fd)
            fsio.fsync_dir(layout.data_dir)
        except OSError as exc:
            raise fsio.unavailable(
                "flush the directory of", layout.object_path(name), exc
            ) from exc


def place(layout: Layout, name: str, data_path: str) -> None:
    """Move the data file of a session already marked completed to ``name``."""
    dir_fd, leaf = open_destination(layout, name)
    try:
        rename_into(layout, dir_fd, name, leaf, data_path)
    finally:
        os.close(dir_fd)
