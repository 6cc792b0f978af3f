"""Session records ("sidecars"): one JSON file per name, replaced atomically.

A sidecar holds ``UploadInfo.to_json()`` plus a format number; it is named by
the SHA-256 of the upload name because names may be 1024 bytes long and
contain ``/``. Sidecars are replaced atomically (temp file, fsync, rename,
fsync of the directory), so a reader sees the old record or the new one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from app.core.model import UploadInfo
from app.errors import StorageUnavailable
from app.stores.filesystem import fsio
from app.stores.filesystem.paths import Layout

log = logging.getLogger(__name__)

_SIDECAR_FORMAT = 1


def stamp(info: UploadInfo) -> UploadInfo:
    """Attach the version token callers pass back for optimistic concurrency."""
    return replace(info, version=f"{info.session_id}:{info.offset}:{info.updated_at:.6f}")


def encode(info: UploadInfo) -> bytes:
    doc = {"format": _SIDECAR_FORMAT, **info.to_json()}
    # ASCII escapes keep any odd metadata text encodable.
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def decode(raw: bytes, path: str) -> UploadInfo:
    try:
        return stamp(UploadInfo.from_json(json.loads(raw)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageUnavailable(
            f"filesystem store: session record {path} is damaged ({exc!r})"
        ) from exc


def write(layout: Layout, info: UploadInfo) -> None:
    fsio.atomic_write(
        layout.tmp_dir,
        layout.sidecar_path(info.name),
        encode(info),
        "save the session record",
        fsync=layout.fsync,
    )


def remove(layout: Layout, name: str) -> None:
    fsio.remove(layout.sidecar_path(name), "remove the session record", fsync=layout.fsync)


def read(layout: Layout, name: str, *, discard_damaged: bool = False) -> UploadInfo | None:
    """The recorded session of ``name``, or None. A damaged record is an
    error, except to ``create``/``cancel`` (``discard_damaged``), which would
    otherwise be blocked by it forever."""
    path = layout.sidecar_path(name)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise fsio.unavailable("read the session record", path, exc) from exc
    try:
        return decode(raw, path)
    except StorageUnavailable as exc:
        if not discard_damaged:
            raise
        log.warning("discarding a session record: %s", exc.message)
        fsio.remove(path, "remove the damaged session record", fsync=layout.fsync)
        return None


def read_many(paths: list[str]) -> list[UploadInfo]:
    """The records at ``paths`` (for listing); gone ones are skipped, damaged ones logged."""
    infos = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                infos.append(decode(f.read(), path))
        except FileNotFoundError:
            continue  # finished or cancelled while listing
        except OSError as exc:
            raise fsio.unavailable("read the session record", path, exc) from exc
        except StorageUnavailable as exc:
            log.warning("skipping a session record: %s", exc.message)
    return infos
