"""RFC 9530 digest fields: ``Content-Digest`` (one request's content) and
``Repr-Digest`` (the whole object).

A ``Content-Digest`` becomes a ``BodyCheck`` for the engine: the request's
bytes are held, hashed and only stored if every supported digest matches.
A ``Repr-Digest`` can only be checked for ``crc32c``, the one digest of the
whole object the engine carries across requests and restarts (a SHA state
cannot be saved between requests); the completing answer reports it.
Algorithms outside the table are ignored, as RFC 9530 allows.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Protocol

from app.core.digests import crc32c_extend
from app.core.structured_fields import parse_byte_sequence_dictionary, serialize_byte_sequence
from app.errors import BadRequest, ChecksumMismatch


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32c:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes, /) -> None:
        self._value = crc32c_extend(self._value, data)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


#: Algorithms from the IANA "Hash Algorithms for HTTP Digest Fields" registry
#: this service computes, with their digest sizes.
ALGORITHMS: dict[str, tuple[Callable[[], _Hash], int]] = {
    "sha-256": (hashlib.sha256, 32),
    "sha-512": (hashlib.sha512, 64),
    "crc32c": (_Crc32c, 4),
}


def parse_digests(value: str, field: str) -> dict[str, bytes]:
    """The supported digests a field carries (maybe none); 400 if malformed."""
    try:
        members = parse_byte_sequence_dictionary(value)
    except ValueError as exc:
        raise BadRequest(f"malformed {field}: {exc}") from None
    found: dict[str, bytes] = {}
    for algorithm, digest in members.items():
        if algorithm not in ALGORITHMS:
            continue
        size = ALGORITHMS[algorithm][1]
        if len(digest) != size:
            raise BadRequest(f"{field}: a {algorithm} digest has {size} bytes, not {len(digest)}")
        found[algorithm] = digest
    return found


class ContentDigestCheck:
    """The engine's ``BodyCheck`` for a request's ``Content-Digest``."""

    def __init__(self, expected: dict[str, bytes]) -> None:
        self._expected = expected
        self._hashes = {name: ALGORITHMS[name][0]() for name in expected}

    def update(self, data: bytes) -> None:
        for digest in self._hashes.values():
            digest.update(data)

    def verify(self) -> None:
        for name, digest in self._hashes.items():
            if not hmac.compare_digest(digest.digest(), self._expected[name]):
                raise ChecksumMismatch(
                    f"the content does not match its Content-Digest ({name}); "
                    "none of it was stored, send it again"
                )


def content_check(value: str | None) -> ContentDigestCheck | None:
    if value is None:
        return None
    expected = parse_digests(value, "Content-Digest")
    return ContentDigestCheck(expected) if expected else None


def repr_crc32c(value: str | None) -> bytes | None:
    """The ``crc32c`` member of a ``Repr-Digest``, the one the engine can check."""
    if value is None:
        return None
    return parse_digests(value, "Repr-Digest").get("crc32c")


def repr_digest_header(crc32c: int) -> str:
    return "crc32c=" + serialize_byte_sequence(crc32c.to_bytes(4, "big"))
