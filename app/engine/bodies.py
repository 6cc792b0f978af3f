"""Request bodies as the engine reads them: the ``Body`` a dialect hands in,
overlap dropped and ranges capped on the way to the store, and bodies held
until a per-request checksum verified them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from app.engine.model import Md5State
from app.errors import LengthMismatch, TooLarge


class BodyInterrupted(Exception):
    """The request body stopped: client gone, stalled past the read timeout, or
    the writer was asked to stop. What arrived before is kept."""


class Body(Protocol):
    """A request body as the engine sees it."""

    async def read(self) -> bytes:
        """The next chunk; ``b""`` at the end. Raises ``BodyInterrupted``."""
        ...

    def abort(self) -> None:
        """Make a pending or future ``read`` raise ``BodyInterrupted``."""
        ...


class BodyCheck(Protocol):
    """A digest of the bytes one request adds (tus ``Upload-Checksum``, the
    IETF draft's ``Content-Digest``): none of them count unless it matches."""

    def update(self, data: bytes) -> None: ...

    def verify(self) -> None:
        """Raise ``ChecksumMismatch`` if the bytes seen do not match."""
        ...


@dataclass
class Flow:
    """What happened to one body while it streamed into the store."""

    interrupted: bool = False
    overflow: bool = False
    seen: int = 0
    md5: Md5State | None = None


async def chunks_of(
    body: Body,
    flow: Flow,
    deadline: asyncio.Timeout,
    *,
    skip: int,
    length: int | None,
    room: int,
    persist_timeout: float,
) -> AsyncIterator[bytes]:
    """The body's bytes as the store should see them: overlap dropped, capped
    at the range, ending quietly when the client goes away (the store then
    gets ``persist_timeout`` to save what arrived)."""
    remaining = length if length is not None else room
    while True:
        try:
            data = await body.read()
        except BodyInterrupted:
            flow.interrupted = True
            deadline.reschedule(
                asyncio.get_running_loop().time() + persist_timeout
            )
            return
        if not data:
            return
        flow.seen += len(data)
        if skip:
            if len(data) <= skip:
                skip -= len(data)
                continue
            data, skip = data[skip:], 0
        if remaining <= 0 or len(data) > remaining:
            flow.overflow = True
            data = data[:remaining]
            if data:
                if flow.md5 is not None:
                    flow.md5.update(data)
                yield data
            return
        remaining -= len(data)
        if flow.md5 is not None:
            flow.md5.update(data)
        yield data
        if remaining == 0 and length is not None:
            # Read on to see whether the client sends more than it declared.
            try:
                extra = await body.read()
            except BodyInterrupted:
                return
            if extra:
                flow.overflow = True
            return


async def verified(
    chunks: AsyncIterator[bytes], check: BodyCheck, flow: Flow, length: int | None,
    buffer_limit: int,
) -> list[bytes] | None:
    """The whole body, once ``check`` matched; None if it stopped early."""
    held: list[bytes] = []
    size = 0
    async for data in chunks:
        size += len(data)
        if size > buffer_limit:
            raise TooLarge(
                f"a request with a checksum may add at most {buffer_limit} "
                "bytes (it is held until verified); send smaller chunks"
            )
        check.update(data)
        held.append(data)
    if flow.overflow:
        raise LengthMismatch("the body is longer than the request declares; nothing was kept")
    if flow.interrupted or (length is not None and size < length):
        return None
    check.verify()
    return held


async def replay(held: list[bytes], let_go: Callable[[int], None]) -> AsyncIterator[bytes]:
    """The held chunks, each dropped once the store took it and then passed
    to ``let_go`` (its memory can be counted as free)."""
    held.reverse()
    while held:
        data = held.pop()
        size = len(data)
        yield data
        del data
        let_go(size)


async def empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator
