"""Completing an upload: the client's digests checked, the store's finish,
and the completion hook, exactly once per upload the engine finishes."""

from __future__ import annotations

import logging

from app.core.digests import crc32c_b64
from app.core.model import UploadInfo
from app.engine.model import ClientDigests, CompletionHook
from app.errors import DigestMismatch, UploadNotFound
from app.stores.base import Store

log = logging.getLogger("app.engine.engine")


class Completion:
    def __init__(self, store: Store, on_complete: CompletionHook | None, *, notify: bool) -> None:
        self._store = store
        self._on_complete = on_complete
        #: Whether finishing records the intent to send a completion callback.
        self._notify = notify

    async def finish(
        self, info: UploadInfo, md5: bytes | None, digests: ClientDigests | None
    ) -> UploadInfo:
        if digests is not None:
            if digests.crc32c is not None and digests.crc32c != info.crc32c.to_bytes(4, "big"):
                await self._discard(info, "crc32c")
                raise DigestMismatch(
                    f"the object's crc32c is {crc32c_b64(info.crc32c)}, not what the client sent; "
                    "the upload was discarded, start it again"
                )
            if digests.md5 is not None and md5 is not None and digests.md5 != md5:
                await self._discard(info, "md5")
                raise DigestMismatch(
                    "the object's md5 differs from what the client sent; "
                    "the upload was discarded, start it again"
                )
        done = await self._store.finish(
            info, md5=md5, notify=self._notify
        )
        if not done.is_complete:
            # The store found acknowledged bytes gone (S3: a part overwritten
            # by a writer that lost the race) and rolled back: ask for them again.
            log.warning("upload %r: the store holds %d bytes, not %s; asking the client "
                        "to resend", done.object_name, done.offset, done.total)
            return done
        log.info("upload %r complete: %d bytes", done.object_name, done.offset)
        if self._on_complete is not None:
            await self._on_complete(done)
        return done

    async def _discard(self, info: UploadInfo, algorithm: str) -> None:
        log.warning("upload %r: %s mismatch with the client's digest; discarding it",
                    info.object_name, algorithm)
        try:
            # Only this session: another process may have replaced the upload
            # since, and that newer upload is not ours to discard.
            await self._store.cancel(info.name, session_id=info.session_id)
        except UploadNotFound:
            pass  # replaced or cancelled meanwhile: nothing of this session is left
