"""Completion callbacks whose intent lives in the session record.

A store that completes an upload with ``finish(..., notify=True)`` keeps
``notify_pending`` in the session record until the receiver confirmed the
callback, so no failure after completion (an outbox write failing, ``kill -9``)
can lose it. This module turns such records back into callbacks (for start-up
and the cleanup job), confirms them after delivery, and builds a notifier
wired to both; the payload is rebuilt from the record, byte for byte the same
as the first attempt, and the callback id is the session id.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp

from app.callbacks.notifier import CompletionNotifier, encode
from app.config import CallbacksConfig
from app.core.digests import crc32c_b64
from app.errors import UploadError
from app.stores.base import CallbackOutbox, PendingNotices, SharedWriting, Store, UploadInfo

log = logging.getLogger("app.callbacks")


def completion_payload(info: UploadInfo) -> dict[str, object]:
    """The callback's JSON for a completed upload (a pure function of the record)."""
    done = info.completed
    assert done is not None
    return {
        # The object, never an id session's internal name (it holds the upload id).
        "name": info.object_name,
        "key": done.key,
        "bucket": done.bucket,
        "size": done.size,
        "content_type": info.content_type,
        "etag": done.etag,
        "crc32c": crc32c_b64(done.crc32c),
        "metadata": dict(info.metadata),
        "owner": info.owner,
        "completed_at": done.completed_at,
    }


async def recorded_callbacks(store: Store) -> list[tuple[str, bytes, str]]:
    """Every callback a session record says is still owed, as (id, body, the
    record's name).

    An unfinished record with the intent is a completion interrupted between
    recording it and finishing (the S3 store records it first): finishing it
    again completes it, or finds it completed, and then it is owed too."""
    owed: list[tuple[str, bytes, str]] = []
    async for info in store.list_completed():
        if info.notify_pending:
            owed.append((info.session_id, encode(completion_payload(info)), info.name))
    interrupted = [info async for info in store.list_unfinished() if info.notify_pending]
    for info in interrupted:
        try:
            done = await _finish_interrupted(store, info)
        except UploadError as exc:
            log.warning("upload %r: an interrupted completion could not be finished (%s); "
                        "it is tried again later", info.object_name, exc.message)
            continue
        if not done.is_complete:
            # The store rolled it back (acknowledged bytes were overwritten):
            # nothing completed, the client is asked to resend.
            log.warning("upload %r: an interrupted completion was rolled back to %d bytes",
                        info.object_name, done.offset)
            continue
        log.info("upload %r: finished an interrupted completion", info.object_name)
        owed.append((done.session_id, encode(completion_payload(done)), done.name))
    return owed


async def _finish_interrupted(store: Store, info: UploadInfo) -> UploadInfo:
    """Finish ``info`` again; on a store shared by instances, once the one
    that was completing it lets go (or its lease runs out, if it died)."""
    if isinstance(store, SharedWriting):
        async with store.writing(info.name, lambda: None):
            return await store.finish(info, notify=True)
    return await store.finish(info, notify=True)


def confirmer(store: Store) -> Callable[[str, str], Awaitable[None]] | None:
    """What clears a delivered callback's intent in its session record."""
    if not isinstance(store, PendingNotices):
        return None
    notices: PendingNotices = store

    async def confirm(callback_id: str, record: str) -> None:
        await notices.clear_notice(record, callback_id)

    return confirm


def notifier_for(
    config: CallbacksConfig, store: Store, session: aiohttp.ClientSession
) -> CompletionNotifier:
    """A notifier that keeps callbacks in the store's outbox and session records."""
    outbox = store if isinstance(store, CallbackOutbox) else None
    notices = isinstance(store, PendingNotices)
    return CompletionNotifier(
        config, outbox, session,
        recorded=(lambda: recorded_callbacks(store)) if notices else None,
        on_delivered=confirmer(store),
    )
