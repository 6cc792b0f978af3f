"""Reading a session, and repairing what a crash left behind on the way.

The data file of an upload may hold bytes past the sidecar's ``offset`` (a
crash between writing data and recording it); those were never acknowledged
and are cut off by the next append or finish, so reading ignores them. Two
states need a repair before a session can be used:

* marked completed, but the data file not yet renamed into place (a crash
  between the two steps of ``finish``): the rename is rolled forward;
* fewer data bytes than the sidecar counts (fsync off, or a damaged disk):
  the session is cut back to what is really there rather than invent bytes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from app.core.digests import crc32c_extend
from app.core.model import UploadInfo
from app.errors import UploadNotFound
from app.stores.filesystem import fsio, sidecars
from app.stores.filesystem.locks import locked
from app.stores.filesystem.paths import Layout, place

log = logging.getLogger(__name__)

_READ_BLOCK = 4 * 1024 * 1024


def load(layout: Layout, name: str) -> UploadInfo:
    """The session of ``name``, after repairing what a crash left behind.

    Reading needs no lock; a repair is decided again under the lock, since
    what looked broken may be another process's step in progress.
    """
    info = sidecars.read(layout, name)
    if info is None:
        raise UploadNotFound(f"no upload in progress for {name!r}")
    if _data_size_if_broken(layout, info) is None:
        return info
    with locked(layout, name):
        return load_locked(layout, name)


def load_locked(layout: Layout, name: str) -> UploadInfo:
    """``load`` for a caller that holds the lock of ``name``."""
    info = sidecars.read(layout, name)
    if info is None:
        raise UploadNotFound(f"no upload in progress for {name!r}")
    if _data_size_if_broken(layout, info) is None:
        return info
    data_path = layout.data_path(info.session_id)
    if info.completed is not None:
        # Marked completed, then a crash before the rename: finish the job.
        place(layout, info.object_name, data_path)
        return info
    return _repair_short_data(layout, info, data_path)


def _data_size_if_broken(layout: Layout, info: UploadInfo) -> int | None:
    """The data file's size (0 if missing) when it disagrees with the
    sidecar in a way a crash leaves behind, else None."""
    data_path = layout.data_path(info.session_id)
    try:
        size: int | None = os.stat(data_path).st_size
    except FileNotFoundError:
        size = None
    except OSError as exc:
        raise fsio.unavailable("inspect", data_path, exc) from exc
    if info.completed is not None:
        return size  # a completed session's data file is renamed away
    if (size or 0) < info.offset:
        return size or 0
    return None


def _repair_short_data(layout: Layout, info: UploadInfo, data_path: str) -> UploadInfo:
    """Report only the bytes really in the data file, with their CRC32C."""
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
        raise fsio.unavailable("read", data_path, exc) from exc
    log.warning(
        "upload %r: data file holds %d bytes but the session counted %d; "
        "continuing from %d", info.name, size, info.offset, size,
    )
    repaired = sidecars.stamp(replace(info, offset=size, crc32c=crc, updated_at=time.time()))
    sidecars.write(layout, repaired)
    return repaired
