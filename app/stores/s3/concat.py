"""``ObjectReader`` for the S3 store: ranged GETs of the finished object,
through the store's own client and error translation."""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.core.model import CompletedObject
from app.errors import OffsetMismatch, UploadNotFound
from app.stores.concat import READ_SIZE
from app.stores.s3.errors import _MISSING_KEY_CODES, _S3Refusal
from app.stores.s3.store import S3Store

#: Bytes per GET: one request per range keeps a dropped connection cheap.
_RANGE = 8 * READ_SIZE
_REPLACED = frozenset({"PreconditionFailed", "412"})


class S3ObjectReader:
    def __init__(self, store: S3Store) -> None:
        self._store = store

    async def read_object(self, done: CompletedObject) -> AsyncIterator[bytes]:
        offset = 0
        while offset < done.size:
            end = min(offset + _RANGE, done.size) - 1
            # If-Match: the object must still be the one that upload finished.
            params = {"Bucket": done.bucket, "Key": done.key,
                      "Range": f"bytes={offset}-{end}", "IfMatch": done.etag}
            try:
                async with self._store._s3_errors("GetObject", _MISSING_KEY_CODES | _REPLACED):
                    result = await self._store._client.get_object(**params)
                    async with result["Body"] as stream:
                        while data := await stream.read(READ_SIZE):
                            offset += len(data)
                            yield data
            except _S3Refusal as refusal:
                if refusal.code in _REPLACED:
                    raise OffsetMismatch(
                        f"the object {done.key!r} was replaced since its upload finished",
                        offset=offset,
                    ) from None
                raise UploadNotFound(f"the object {done.key!r} no longer exists") from None
            if offset <= end:
                raise OffsetMismatch(
                    f"{done.key!r} ended at byte {offset}, before the {done.size} it was "
                    "finished with", offset=offset,
                )
