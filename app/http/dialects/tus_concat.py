"""tus concatenation: a final upload assembled from finished partial uploads.

The partials are hidden objects the store already holds. Where the store can
join them itself (``Concatenation``: S3 ``UploadPartCopy`` for partials of at
least 5 MiB, ``copy_file_range`` on the filesystem) no byte passes through
the service, and the final CRC32C is combined from the partials'. Otherwise
their bytes are read back (``ObjectReader``) and appended to the final
session by the engine like any other body; each partial is then checked
against the CRC32C it finished with as it is read, so a partial that changed
since stops the assembly before the final upload can finish.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from app.core.digests import crc32c_extend
from app.core.grant import Grant
from app.core.model import CompletedObject, UploadInfo
from app.engine.bodies import BodyInterrupted
from app.engine.engine import UploadEngine
from app.engine.model import Outcome
from app.errors import BadRequest, StorageUnavailable, UploadError
from app.http.dialects.tus_headers import concat_of
from app.stores.base import Concatenation, ObjectReader, Store

log = logging.getLogger(__name__)


async def finished_partial(engine: UploadEngine, session: str) -> UploadInfo:
    info = await engine.lookup(session)
    concat = concat_of(info.metadata)
    if concat is None or concat.final:
        raise BadRequest("Upload-Concat: final may only join partial uploads")
    if info.completed is None:
        raise BadRequest(
            f"a partial upload holds {info.offset} of {info.total or 'its'} bytes; "
            "finish it before joining it"
        )
    return info


def size_of(info: UploadInfo) -> int:
    assert info.completed is not None
    return info.completed.size


class PartsBody:
    """The partials' bytes one after another, as the engine's ``Body``."""

    def __init__(self, reader: ObjectReader, parts: Sequence[CompletedObject]) -> None:
        self._chunks = self._read_all(reader, parts)
        self._aborted = False
        #: Why the body stopped early, to report once the engine is done.
        self.failure: UploadError | None = None

    async def read(self) -> bytes:
        if self._aborted:
            raise BodyInterrupted("another request took over this upload")
        try:
            return await anext(self._chunks, b"")
        except UploadError as exc:
            self.failure = exc
            raise BodyInterrupted(exc.message) from None

    def abort(self) -> None:
        self._aborted = True

    @staticmethod
    async def _read_all(
        reader: ObjectReader, parts: Sequence[CompletedObject]
    ) -> AsyncIterator[bytes]:
        for part in parts:
            crc = 0
            held: bytes | None = None
            # Each partial's last chunk is held back until its CRC32C matched,
            # so a changed partial never completes the final upload.
            async for data in reader.read_object(part):
                if held is not None:
                    yield held
                crc = crc32c_extend(crc, data)
                held = data
            if crc != part.crc32c:
                raise StorageUnavailable(
                    f"the partial upload in {part.key!r} changed since it finished "
                    "(CRC32C differs); upload it again"
                )
            if held is not None:
                yield held


def can_concatenate(store: Store) -> bool:
    return isinstance(store, Concatenation | ObjectReader)


async def assemble(
    engine: UploadEngine,
    store: Store,
    info: UploadInfo,
    partials: Sequence[UploadInfo],
    grant: Grant,
) -> Outcome:
    parts = [p.completed for p in partials if p.completed is not None]
    assert info.total is not None
    if info.total == 0:
        return await engine.status(info.name, 0, grant)
    if isinstance(store, Concatenation) and store.can_join(parts):
        try:
            return await engine.concatenate(info.name, parts, store, grant)
        except UploadError:
            # A partial gone or changed: the empty final upload is of no use.
            await engine.cancel(info.name, grant)
            raise
    if not isinstance(store, ObjectReader):
        raise BadRequest("this server's store cannot join these uploads")
    log.info("upload %r: the store cannot join these partials itself; streaming them",
             info.name)
    return await _stream(engine, store, info, parts, grant)


async def _stream(
    engine: UploadEngine,
    reader: ObjectReader,
    info: UploadInfo,
    parts: Sequence[CompletedObject],
    grant: Grant,
) -> Outcome:
    assert info.total is not None
    body = PartsBody(reader, parts)
    outcome = await engine.append(info.name, 0, body, length=info.total, total=None, grant=grant)
    if not outcome.complete:
        # Not a client's drop: the store could not give the partials back whole.
        await engine.cancel(info.name, grant)
        raise body.failure or StorageUnavailable(
            "the partial uploads could not be read back whole; try the final upload again"
        )
    return outcome
