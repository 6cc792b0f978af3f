"""Who stored each finished object (``ObjectOwners``): one small JSON file per
object name under ``.uploads/owners/``, kept with the object rather than with
its session record, so the owner outlives a forgotten or cancelled record."""

from __future__ import annotations

import json
import os

from app.stores.filesystem import fsio
from app.stores.filesystem.paths import Layout


def read_raw(layout: Layout, name: str) -> bytes | None:
    try:
        with open(layout.owner_path(name), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise fsio.unavailable("read the owner of", layout.object_path(name), exc) from exc


def write(layout: Layout, name: str, owner: str | None) -> None:
    """Record ``owner`` for the object about to be placed at ``name``."""
    if owner is None:
        fsio.remove(layout.owner_path(name), "forget the owner of", fsync=layout.fsync)
        return
    raw = json.dumps({"name": name, "owner": owner}).encode("ascii")
    restore(layout, name, raw)


def restore(layout: Layout, name: str, raw: bytes | None) -> None:
    """Put back what ``read_raw`` returned (None: no owner file)."""
    if raw is None:
        fsio.remove(layout.owner_path(name), "forget the owner of", fsync=layout.fsync)
        return
    fsio.atomic_write(layout.tmp_dir, layout.owner_path(name), raw,
                      "record the owner of", fsync=layout.fsync)


def owner_of(layout: Layout, name: str) -> str | None:
    if not os.path.lexists(layout.object_path(name)):
        return None  # an owner file outlived by a crash names no object
    raw = read_raw(layout, name)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        owner = doc["owner"] if doc.get("name") == name else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None
