"""Part bookkeeping shared by the write path and completion: what one write
in progress holds (``WriteState``, ``Fill``), the count of part buffers held
(``BufferGauge``, this store's share of the app's ``MemoryBudget``) and the
UploadPart call itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.core.budget import MemoryBudget
from app.core.digests import crc32c_b64, crc32c_combine
from app.errors import Overloaded
from app.stores.s3.client import S3Client
from app.stores.s3.errors import NO_UPLOAD_CODES
from app.stores.s3.records import Layout, Part, Record, Segment

log = logging.getLogger("app.stores.s3")

_T = TypeVar("_T")


class BufferGauge:
    """Bytes of part buffers the store holds right now, and the peak."""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0

    def hold(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def release(self, size: int) -> None:
        self.held -= size

    def reset_peak(self) -> None:
        self.peak = self.held


#: Most bytes per write of a part body to the connection.
_SLICE = 256 * 1024


class PartBody:
    """A part's bytes as UploadPart's body: the pieces they arrived in,
    written to the connection as ``memoryview`` slices of them, never copied.

    Handed one buffer, botocore wraps ``bytes`` in a ``BytesIO`` that aiohttp
    copies (twice), aiohttp copies a ``bytearray`` and, on Python before
    3.12.9, joins the body with the request head (another copy), and asyncio
    copies whatever the socket does not take at once into its buffer; pieces
    of at most ``_SLICE`` that the socket mostly takes whole cost none of
    these, and the part is never joined. botocore sees a file (``read``,
    ``seek``, ``tell``: what payload signing and a retry's rewind use; only a
    ``read`` joins the pieces), aiohttp an async iterable, iterated afresh for
    every attempt."""

    def __init__(self, pieces: Sequence[bytes | bytearray]) -> None:
        self._pieces = pieces
        self._size = sum(len(p) for p in pieces)
        self._pos = 0
        self._joined: bytes | None = None

    def __len__(self) -> int:
        return self._size

    @property
    def pieces(self) -> Sequence[bytes | bytearray]:
        return self._pieces

    def read(self, size: int | None = -1) -> bytes:
        if self._joined is None:
            self._joined = b"".join(self._pieces)
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        chunk = self._joined[self._pos : end]
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._slices()

    async def _slices(self) -> AsyncIterator[memoryview]:
        skip = self._pos
        for piece in self._pieces:
            view = memoryview(piece)
            if skip >= len(view):
                skip -= len(view)
                continue
            for at in range(skip, len(view), _SLICE):
                yield view[at : at + _SLICE]
            skip = 0


async def upload_part(
    client: S3Client, layout: Layout, record: Record, number: int,
    pieces: Sequence[bytes | bytearray], part_crc: int,
) -> dict[str, Any]:
    """UploadPart ``number`` of the record's multipart upload: the bytes of
    ``pieces``, in order."""
    params: dict[str, Any] = {
        "Key": layout.object_key(record.object_name),
        "UploadId": record.upload_id,
        "PartNumber": number,
        "Body": PartBody(pieces),
    }
    if record.checksum_algorithm:
        # S3 rejects the part if the bytes it got do not match this CRC.
        params["ChecksumCRC32C"] = crc32c_b64(part_crc)
    return await client.call("UploadPart", NO_UPLOAD_CODES, **params)


async def close_quietly(chunks: AsyncIterable[bytes] | AsyncIterator[bytes]) -> None:
    """Close a chunk stream the write stops reading early (if it can be closed)."""
    closer = getattr(chunks, "aclose", None)
    if closer is None:
        return
    try:
        await closer()
    except Exception:
        log.debug("closing the chunk stream failed", exc_info=True)


def bare_etag(etag: object) -> str:
    return str(etag).strip('"')


@dataclass
class WriteState:
    """Bookkeeping shared by a write's main loop and its part-upload tasks."""

    record: Record
    etag: str
    #: Settled total for this write (the record's or the one ``write`` got).
    total: int | None
    #: Staged segments at the start of the write: the prefix of its first part.
    prefix: tuple[Segment, ...]
    first_part: int
    #: Highest part number the record covers; parts above it are not durable yet.
    committed_part: int
    semaphore: asyncio.Semaphore
    gauge: BufferGauge
    budget: MemoryBudget
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    #: Part number -> (offset at its end, CRC32C of [0, that offset)).
    boundaries: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Part number -> the part as it landed (ETag, its CRC32C), for the record.
    landed: dict[int, Part] = field(default_factory=dict)
    failure: BaseException | None = None
    #: Set when the budget had no buffer for this write in time: the write
    #: keeps what it read and then ends with it.
    overloaded: Overloaded | None = None
    buffered: int = 0
    #: The body has ended: the final record write records its last part.
    ended: bool = False
    last_launched: int = 0
    #: Segments this write began to stage: a cancellation deletes those the
    #: record does not name.
    staging: list[Segment] = field(default_factory=list)

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc

    async def reserve(self, size: int) -> None:
        """Take a buffer of ``size`` from the budget, waiting for it
        (``Overloaded`` when it does not come in time)."""
        await self.budget.acquire(size)
        self.gauge.hold(size)
        self.buffered += size

    def hold(self, size: int) -> None:
        """Count a buffer for bytes already in memory, without waiting."""
        self.budget.hold(size)
        self.gauge.hold(size)
        self.buffered += size

    def release(self, size: int) -> None:
        self.budget.release(size)
        self.gauge.release(size)
        self.buffered -= size


@dataclass
class Fill:
    """The part being filled, and where the write has got to.

    The part's new bytes are kept as the pieces they arrived in (short ones
    gathered), and sent as they are (``PartBody``): no part buffer is filled
    and copied. Each byte is
    run through CRC32C once (``new_crc``); the upload's and the part's
    running CRCs are combined from it when a part or the write ends."""

    size: int
    limit: int
    number: int
    start: int
    length: int
    #: Bytes of the part present (staged ones included), and where this write's start.
    pos: int
    new_from: int
    prefix_len: int
    #: CRC32C of the part's bytes before ``new_from`` (the staged prefix; 0 if none).
    part_crc: int
    #: Upload offset reached, and the CRC32C of [0, the part's ``new_from``).
    offset: int
    crc: int
    #: This write's bytes of the part, [new_from, pos); None: no buffer held.
    pieces: list[bytes | bytearray] | None = None
    #: CRC32C of the bytes in ``pieces``.
    new_crc: int = 0
    #: Bytes of the memory budget held for this part.
    reserved: int = 0

    def crc_now(self) -> int:
        """CRC32C of the upload's bytes [0, offset)."""
        return crc32c_combine(self.crc, self.new_crc, self.pos - self.new_from)

    def part_crc_now(self) -> int:
        """CRC32C of the part's bytes [0, pos)."""
        return crc32c_combine(self.part_crc, self.new_crc, self.pos - self.new_from)

    def next_part(self, crc: int) -> None:
        """Move on to the next part; ``crc``: ``crc_now()`` at the end of this one."""
        self.number += 1
        self.start += self.length
        self.length = min(self.size, self.limit - self.start)
        self.pos = self.new_from = self.prefix_len = 0
        self.part_crc = self.new_crc = self.reserved = 0
        self.crc = crc
        self.pieces = None
