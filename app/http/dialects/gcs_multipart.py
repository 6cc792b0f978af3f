"""A ``multipart/related`` upload body as the engine reads it: the metadata
part read whole (bounded), then the media part streamed up to the closing
boundary. The byte-level parsing is pure, in ``gcs_wire``."""

from __future__ import annotations

from app.engine.bodies import BodyInterrupted
from app.errors import BadRequest
from app.http.body import RequestBody
from app.http.dialects.gcs_wire import MediaSplitter, MultipartHead, parse_multipart_head


class MultipartMedia:
    """The media part of a ``multipart/related`` body, as an engine Body: it
    ends at the closing boundary; a body that stops before it is interrupted."""

    def __init__(self, inner: RequestBody, boundary: str, leftover: bytes) -> None:
        self._inner = inner
        self.splitter = MediaSplitter(boundary)
        self._leftover: bytes | None = leftover
        #: The request body ended without the closing boundary.
        self.unclosed = False

    async def read(self) -> bytes:
        while not self.splitter.finished:
            if self._leftover is not None:
                data, self._leftover = self._leftover, None
            else:
                data = await self._inner.read()
                if not data:
                    self.unclosed = True
                    raise BodyInterrupted("the multipart body ended before its closing boundary")
            media = self.splitter.feed(data)
            if self.splitter.finished:
                await self._check_trailer()
            if media:
                return media
        return b""

    async def _check_trailer(self) -> None:
        # Before the engine sees the end: a third part must fail the upload,
        # not complete it with the second.
        while len(self.splitter.trailer) < 2:
            data = await self._inner.read()
            if not data:
                break
            self.splitter.feed(data)
        self.splitter.check_closed()

    def abort(self) -> None:
        self._inner.abort()


async def read_multipart_head(
    body: RequestBody, boundary: str, limit: int
) -> tuple[MultipartHead, bytes]:
    """The metadata part and media headers (at most ``limit`` bytes), and the
    media bytes that came with them."""
    buf = b""
    while True:
        head = parse_multipart_head(buf, boundary)
        if head is not None:
            return head, buf[head.consumed :]
        if len(buf) > limit:
            raise BadRequest(
                f"the multipart metadata part is larger than {limit} bytes"
            )
        try:
            data = await body.read()
        except BodyInterrupted:
            raise BadRequest("the multipart body ended inside its metadata part") from None
        if not data:
            raise BadRequest("the multipart body ended inside its metadata part")
        buf += data
