"""One interface over what ``upload()`` accepts: a path, a binary file object,
bytes, or an async iterator of bytes."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import BinaryIO

SourceLike = (
    str | os.PathLike[str] | BinaryIO | bytes | bytearray | memoryview | AsyncIterable[bytes]
)


class Source:
    """Sequential reads from byte 0 of the object; ``seek`` only when ``seekable``."""

    total: int | None = None
    seekable: bool = False

    async def read(self, n: int) -> bytes:
        raise NotImplementedError

    async def seek(self, position: int) -> None:
        raise OSError("this source cannot seek")

    async def close(self) -> None:
        return None


class BytesSource(Source):
    seekable = True

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(bytes(data))
        self.total = len(self._data)
        self._pos = 0

    async def read(self, n: int) -> bytes:
        piece = self._data[self._pos:self._pos + n]
        self._pos += len(piece)
        return bytes(piece)

    async def seek(self, position: int) -> None:
        self._pos = position


class FileSource(Source):
    """A binary file object; byte 0 is where it stood when handed over. Reads
    run in a thread, since a disk or a pipe can block the event loop."""

    def __init__(self, fh: BinaryIO, *, owned: bool = False) -> None:
        self._fh = fh
        self._owned = owned
        self._origin = 0
        try:
            self.seekable = fh.seekable()
        except (AttributeError, ValueError, OSError):
            self.seekable = False
        if self.seekable:
            self._origin = fh.tell()
            end = fh.seek(0, io.SEEK_END)
            fh.seek(self._origin)
            self.total = end - self._origin

    async def read(self, n: int) -> bytes:
        reader = getattr(self._fh, "read1", None) if not self.seekable else None
        if reader is not None:
            # For pipes: whatever is there now, rather than blocking for all n.
            return await asyncio.to_thread(reader, n)
        return await asyncio.to_thread(self._fh.read, n)

    async def seek(self, position: int) -> None:
        if not self.seekable:
            raise OSError("this source cannot seek")
        await asyncio.to_thread(self._fh.seek, self._origin + position)

    async def close(self) -> None:
        if self._owned:
            self._fh.close()


class IterSource(Source):
    def __init__(self, iterable: AsyncIterable[bytes]) -> None:
        self._it: AsyncIterator[bytes] = aiter(iterable)
        self._done = False

    async def read(self, n: int) -> bytes:
        # The iterator's pieces are passed on as they come (the caller buffers),
        # except for empty ones, which would look like the end.
        while not self._done:
            try:
                piece = await anext(self._it)
            except StopAsyncIteration:
                self._done = True
                break
            if piece:
                return bytes(piece)
        return b""


def open_source(source: SourceLike | Source) -> Source:
    if isinstance(source, Source):
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        return BytesSource(source)
    if isinstance(source, str | os.PathLike):
        return FileSource(Path(source).open("rb"), owned=True)
    if hasattr(source, "read"):
        return FileSource(source)  # type: ignore[arg-type]
    if hasattr(source, "__aiter__"):
        return IterSource(source)
    raise TypeError(f"cannot upload from {type(source).__name__}: "
                    "give a path, a binary file, bytes or an async iterator of bytes")
