"""Pure helpers of the tus dialect, table-driven: header parsing, request
checksums, combining CRC32C values."""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from collections.abc import Callable

import google_crc32c
import pytest

from app.core.checksums import ALGORITHMS, RequestChecksum
from app.core.digests import crc32c_combine
from app.errors import BadRequest, ChecksumMismatch
from app.http.dialects.tus_headers import (
    CONCAT_KEY,
    Concat,
    VersionMismatch,
    check_version,
    concat_of,
    concat_record,
    format_metadata,
    http_date,
    parse_checksum,
    parse_concat,
    parse_metadata,
    parse_number,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(("header", "expected"), [
    (None, {}),
    ("", {}),
    (f"filename {b64('a b.txt')}", {"filename": "a b.txt"}),
    (f"filename {b64('x')},is_confidential", {"filename": "x", "is_confidential": ""}),
    (f" name {b64('Grüße 😀')} , type {b64('image/png')}",
     {"name": "Grüße 😀", "type": "image/png"}),
])
def test_metadata_parses(header: str | None, expected: dict[str, str]) -> None:
    assert parse_metadata(header) == expected


@pytest.mark.parametrize("header", [
    "name not-base64!",
    f"name {b64('a')} extra",
    f"n@me {b64('a')}",
    f"name {b64('a')},name {b64('b')}",
    f"{CONCAT_KEY} {b64('final;x')}",
    f"ünï {b64('a')}",
    "name " + base64.b64encode(b"\xff\xfe").decode(),
    f",name {b64('a')}",
])
def test_metadata_refuses(header: str) -> None:
    with pytest.raises(BadRequest):
        parse_metadata(header)


def test_metadata_round_trips_without_internal_keys() -> None:
    metadata = {"filename": "ü.bin", "flag": "", CONCAT_KEY: "partial"}
    assert parse_metadata(format_metadata(metadata)) == {"filename": "ü.bin", "flag": ""}


@pytest.mark.parametrize(("algorithm", "digest"), [
    ("sha1", lambda d: hashlib.sha1(d).digest()),
    ("md5", lambda d: hashlib.md5(d).digest()),
    ("sha256", lambda d: hashlib.sha256(d).digest()),
    ("crc32", lambda d: zlib.crc32(d).to_bytes(4, "big")),
    ("crc32c", lambda d: google_crc32c.value(d).to_bytes(4, "big")),
])
def test_checksums_verify_in_pieces(algorithm: str, digest: Callable[[bytes], bytes]) -> None:
    assert algorithm in ALGORITHMS
    data = os.urandom(10_000)
    check = parse_checksum(f"{algorithm.upper()} {base64.b64encode(digest(data)).decode()}")
    assert check is not None
    for i in range(0, len(data), 999):
        check.update(data[i:i + 999])
    check.verify()
    wrong = RequestChecksum(algorithm, digest(b"other"))
    wrong.update(data)
    with pytest.raises(ChecksumMismatch):
        wrong.verify()


@pytest.mark.parametrize("header", [
    "sha1", "sha1 AAAA extra", "whirlpool " + base64.b64encode(b"x" * 20).decode(),
    "sha1 not*base64", "sha1 " + base64.b64encode(b"short").decode(),
])
def test_checksum_header_refuses(header: str) -> None:
    with pytest.raises(BadRequest):
        parse_checksum(header)


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("partial", Concat(final=False)),
    ("final;http://h/files/abc /files/def", Concat(final=True, ids=("abc", "def"))),
    ("final; https://h:1/files/abc", Concat(final=True, ids=("abc",))),
])
def test_concat_parses(header: str | None, expected: Concat | None) -> None:
    assert parse_concat(header, "/files/") == expected


@pytest.mark.parametrize("header", [
    "final", "final;", "partial;x", "other", "final;/elsewhere/abc", "final;/files/a/b",
    "final;/files/", "final;" + " ".join(f"/files/{i}" for i in range(33)),
])
def test_concat_refuses(header: str) -> None:
    with pytest.raises(BadRequest):
        parse_concat(header, "/files/")


def test_concat_record_round_trips() -> None:
    for concat in (Concat(final=False), Concat(final=True, ids=("a", "b"))):
        assert concat_of({CONCAT_KEY: concat_record(concat)}) == concat
    assert concat_of({}) is None


def test_version_numbers_and_dates() -> None:
    check_version("1.0.0")
    for bad in (None, "0.2.2", "1.0"):
        with pytest.raises(VersionMismatch):
            check_version(bad)
    assert parse_number(None, "X") is None
    assert parse_number(" 42 ", "X") == 42
    for bad in ("-1", "1.5", "01", "abc", "9" * 20):
        with pytest.raises(BadRequest):
            parse_number(bad, "X")
    assert http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


@pytest.mark.parametrize(("len_a", "len_b"), [
    (0, 0), (0, 7), (7, 0), (1, 1), (3, 1000), (65_537, 5), (1 << 20, (1 << 20) + 3),
])
def test_crc32c_combine(len_a: int, len_b: int) -> None:
    a, b = os.urandom(len_a), os.urandom(len_b)
    combined = crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), len_b)
    assert combined == google_crc32c.value(a + b)
