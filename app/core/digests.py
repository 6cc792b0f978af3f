"""CRC32C and MD5 helpers shared by the engine and the stores.

CRC32C is the digest the service can always give: its running value is four
bytes, so it is persisted with the upload and stays right across resumes,
processes and restarts. MD5 state cannot be saved, so it is only known for an
upload that went through one request from its first byte to its last.
"""

from __future__ import annotations

import base64
import binascii

import google_crc32c


def crc32c_extend(crc: int, data: bytes) -> int:
    # google_crc32c only accepts immutable bytes.
    return google_crc32c.extend(crc, data if isinstance(data, bytes) else bytes(data))


def crc32c_b64(crc: int) -> str:
    """Base64 of the big-endian CRC32C, as GCS reports it."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def md5_b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def parse_goog_hash(header: str) -> dict[str, bytes]:
    """Parse ``x-goog-hash: crc32c=<b64>,md5=<b64>`` into raw digests.

    Unknown algorithms are ignored; a malformed value raises ``ValueError``.
    """
    found: dict[str, bytes] = {}
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        algo, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"malformed x-goog-hash item {item!r}")
        algo = algo.strip().lower()
        if algo not in ("crc32c", "md5"):
            continue
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"x-goog-hash {algo} is not valid base64") from exc
        if len(raw) != (4 if algo == "crc32c" else 16):
            raise ValueError(f"x-goog-hash {algo} has the wrong length")
        found[algo] = raw
    return found


# -- combining CRC32C values --------------------------------------------------
# crc(A || B) follows from crc(A), crc(B) and len(B) alone: shifting crc(A)
# past len(B) zero bytes is a multiplication by x^(8·len(B)) in GF(2)[x] modulo
# the CRC polynomial (the classic zlib crc32_combine construction). That lets a
# store that assembled an object from parts state its CRC32C without reading it.

_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _gf2_times(a: int, b: int) -> int:
    """a·b mod P for reflected 32-bit polynomials."""
    product = 0
    mask = 0x80000000
    while mask:
        if a & mask:
            product ^= b
        b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1
        mask >>= 1
    return product


def _x_pow_8n(n: int) -> int:
    """x^(8·n) mod P, by squaring."""
    result = 0x80000000  # x^0
    square = 0x00800000  # x^8 (one byte)
    while n:
        if n & 1:
            result = _gf2_times(square, result)
        n >>= 1
        square = _gf2_times(square, square)
    return result


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """The CRC32C of ``A || B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``."""
    if len_b == 0:
        return crc_a
    return _gf2_times(_x_pow_8n(len_b), crc_a) ^ crc_b
