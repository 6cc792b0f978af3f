"""What the engine hands back and takes in besides bodies: outcomes, client
digests, hooks and running MD5s."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from app.core.model import UploadInfo


@dataclass(frozen=True)
class ClientDigests:
    """Digests the client declared for the whole object (``x-goog-hash``)."""

    crc32c: bytes | None = None
    md5: bytes | None = None


@dataclass(frozen=True)
class Outcome:
    info: UploadInfo
    #: The body stopped before the end of its range (client gone or taken over).
    interrupted: bool = False
    #: Bytes of this request's body that were stored (after skipping overlap).
    stored: int = 0

    @property
    def complete(self) -> bool:
        return self.info.is_complete


CompletionHook = Callable[[UploadInfo], Awaitable[None]]
#: Called with a completed upload whose callback is still pending: on a repeat
#: request (``replacing`` False: deliver it again if nobody is), and before its
#: record is replaced or dropped (``replacing`` True: keep the callback
#: elsewhere, or raise so the record stays).
NoticeHook = Callable[[UploadInfo, bool], Awaitable[None]]


class Md5State(Protocol):
    """A running MD5 (``hashlib.md5()`` or a caller's wrapper of one)."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


#: Given the offset a write starts at, a running MD5 of the upload's bytes
#: ``[0, offset)`` if the caller followed them across earlier requests (None:
#: unknown). The engine feeds it exactly the bytes it hands the store, so a
#: chunked upload can record and check an MD5, which hashlib cannot persist.
Md5Source = Callable[[int], Md5State | None]
