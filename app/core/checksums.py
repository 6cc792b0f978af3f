"""Per-request digests (tus ``Upload-Checksum``, the IETF draft's
``Content-Digest``) as the engine's ``BodyCheck``: fed every byte a request
adds, then verified before any of them count."""

from __future__ import annotations

import hashlib
import hmac
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import google_crc32c

from app.errors import BadRequest, ChecksumMismatch


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    """A CRC as a hashlib-like object: ``update`` then a big-endian ``digest``."""

    def __init__(self, extend: Callable[[int, bytes], int]) -> None:
        self._extend = extend
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._extend(self._value, data)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


def _crc32c_extend(crc: int, data: bytes) -> int:
    return google_crc32c.extend(crc, data if isinstance(data, bytes) else bytes(data))


def _crc32_extend(crc: int, data: bytes) -> int:
    return zlib.crc32(data, crc)


#: Algorithm name (as tus spells it) -> (factory, digest length in bytes).
_ALGORITHMS: dict[str, tuple[Callable[[], _Hasher], int]] = {
    "sha1": (hashlib.sha1, 20),
    "md5": (hashlib.md5, 16),
    "sha256": (hashlib.sha256, 32),
    "crc32": (lambda: _Crc(_crc32_extend), 4),
    "crc32c": (lambda: _Crc(_crc32c_extend), 4),
}

#: What this service checks, in the order ``Tus-Checksum-Algorithm`` lists them.
ALGORITHMS: tuple[str, ...] = tuple(_ALGORITHMS)


@dataclass
class RequestChecksum:
    """A ``BodyCheck`` for one request: ``expected`` is the raw digest the
    client sent for exactly the bytes of its body."""

    algorithm: str
    expected: bytes
    _hasher: _Hasher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        known = _ALGORITHMS.get(self.algorithm)
        if known is None:
            raise BadRequest(
                f"checksum algorithm {self.algorithm!r} is not supported; "
                f"use one of {', '.join(ALGORITHMS)}"
            )
        factory, size = known
        if len(self.expected) != size:
            raise BadRequest(
                f"a {self.algorithm} checksum is {size} bytes, not {len(self.expected)}"
            )
        self._hasher = factory()

    def update(self, data: bytes) -> None:
        self._hasher.update(data)

    def verify(self) -> None:
        if not hmac.compare_digest(self._hasher.digest(), self.expected):
            raise ChecksumMismatch(
                f"the body does not match its {self.algorithm} checksum; "
                "none of it was stored, send it again"
            )
