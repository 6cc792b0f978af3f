"""Completion callbacks not yet delivered, one JSON file each (``CallbackOutbox``)."""

from __future__ import annotations

import logging
import time

from app.core.model import PendingCallback, oldest_first
from app.stores.filesystem import fsio
from app.stores.filesystem.paths import Layout

log = logging.getLogger(__name__)


def save(layout: Layout, callback_id: str, payload: bytes) -> None:
    raw = PendingCallback(callback_id, bytes(payload), time.time()).to_json()
    fsio.atomic_write(
        layout.tmp_dir,
        layout.callback_path(callback_id),
        raw,
        "save the pending callback",
        fsync=layout.fsync,
    )


def delete(layout: Layout, callback_id: str) -> None:
    fsio.remove(layout.callback_path(callback_id), "delete the callback", fsync=layout.fsync)


def list_all(layout: Layout) -> list[tuple[str, bytes]]:
    found: list[PendingCallback] = []
    for path in fsio.list_dir(layout.callbacks_dir, ".json"):
        try:
            with open(path, "rb") as f:
                found.append(PendingCallback.from_json(f.read()))
        except FileNotFoundError:
            continue  # delivered while listing
        except OSError as exc:
            raise fsio.unavailable("read the pending callback", path, exc) from exc
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping damaged callback record %s: %r", path, exc)
    return oldest_first(found)
