"""Pure, table-driven: structured fields, the interop-version table, file
names from Content-Disposition, RFC 9530 digests."""

from __future__ import annotations

import base64
import hashlib

import google_crc32c
import pytest

from app.core import ietf_versions as iv
from app.core.content_disposition import filename_of
from app.core.http_digests import content_check, parse_digests, repr_crc32c, repr_digest_header
from app.core.structured_fields import (
    parse_boolean,
    parse_byte_sequence_dictionary,
    parse_integer,
    parse_non_negative,
)
from app.errors import BadRequest, ChecksumMismatch


@pytest.mark.parametrize(("raw", "value"), [
    ("0", 0), ("42", 42), (" 7 ", 7), ("-3", -3), ("12;a=1", 12), ("999999999999999", 10**15 - 1),
])
def test_integers(raw: str, value: int) -> None:
    assert parse_integer(raw) == value


@pytest.mark.parametrize("raw", ["", "1.5", "+1", "0x10", "1 2", "1000000000000000", "1;;"])
def test_bad_integers(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_integer(raw)


def test_non_negative() -> None:
    assert parse_non_negative("5") == 5
    with pytest.raises(ValueError):
        parse_non_negative("-1")


@pytest.mark.parametrize(("raw", "value"), [("?1", True), ("?0", False), ("?1;x", True)])
def test_booleans(raw: str, value: bool) -> None:
    assert parse_boolean(raw) is value


@pytest.mark.parametrize("raw", ["1", "true", "?", "?2", ""])
def test_bad_booleans(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_boolean(raw)


def test_byte_sequence_dictionary() -> None:
    found = parse_byte_sequence_dictionary("sha-256=:AQID:, flag, n=3, crc32c=:AAAAAA==:;p")
    assert found == {"sha-256": b"\x01\x02\x03", "crc32c": b"\x00\x00\x00\x00"}
    for bad in ("", "Sha=:AA==:", "a=:@@:", "a=:AA==:,,b"):
        with pytest.raises(ValueError):
            parse_byte_sequence_dictionary(bad)


# -- the version table ---------------------------------------------------------------


@pytest.mark.parametrize(("number", "field", "partial", "limits", "status"), [
    (3, "Upload-Incomplete", False, False, 201),
    (4, "Upload-Complete", False, False, 201),
    (5, "Upload-Complete", False, False, 201),
    (6, "Upload-Complete", True, True, 201),
    (7, "Upload-Complete", True, True, 204),
    (8, "Upload-Complete", True, True, 204),
])
def test_versions(number: int, field: str, partial: bool, limits: bool, status: int) -> None:
    version = iv.negotiate(str(number))
    assert version.complete_field == field
    assert version.needs_partial_upload_type is partial
    assert version.has_limits is limits
    assert version.append_status == status


def test_current_version_is_8() -> None:
    assert iv.CURRENT.number == 8


@pytest.mark.parametrize("raw", ["1", "2", "9", "x", ""])
def test_unserved_versions(raw: str) -> None:
    with pytest.raises(iv.FieldError):
        iv.negotiate(raw)


@pytest.mark.parametrize(("number", "headers", "complete"), [
    (3, {"Upload-Incomplete": "?0"}, True),
    (3, {"Upload-Incomplete": "?1"}, False),
    (3, {"Upload-Complete": "?1"}, None),
    (8, {"Upload-Complete": "?1"}, True),
    (8, {"Upload-Complete": "?0"}, False),
    (8, {"Upload-Incomplete": "?0"}, None),
])
def test_read_complete(number: int, headers: dict[str, str], complete: bool | None) -> None:
    assert iv.VERSIONS[number].read_complete(headers) is complete


def test_complete_headers_per_version() -> None:
    assert iv.VERSIONS[3].complete_headers(True) == {"Upload-Incomplete": "?0"}
    assert iv.VERSIONS[3].complete_headers(False) == {"Upload-Incomplete": "?1"}
    assert iv.VERSIONS[5].complete_headers(True) == {"Upload-Complete": "?1"}


@pytest.mark.parametrize(("number", "headers", "refused"), [
    (3, {"Upload-Offset": "1"}, True),
    (5, {"Upload-Complete": "?0"}, True),
    (6, {"Upload-Length": "9"}, True),
    (7, {"Upload-Length": "9", "Upload-Offset": "1"}, False),
    (8, {}, False),
])
def test_probe_fields(number: int, headers: dict[str, str], refused: bool) -> None:
    version = iv.VERSIONS[number]
    if refused:
        with pytest.raises(iv.FieldError):
            version.check_probe_fields(headers)
    else:
        version.check_probe_fields(headers)


@pytest.mark.parametrize(("offset", "upload_length", "content_length", "complete", "total"), [
    (0, None, 100, True, 100),
    (0, None, 100, False, None),
    (0, 500, 100, False, 500),
    (50, None, 100, True, 150),
    (50, 150, 100, True, 150),
    (0, None, None, True, None),
])
def test_stated_total(offset, upload_length, content_length, complete, total) -> None:
    assert iv.stated_total(offset=offset, upload_length=upload_length,
                           content_length=content_length, complete=complete) == total


def test_inconsistent_lengths() -> None:
    with pytest.raises(iv.InconsistentLength):
        iv.stated_total(offset=0, upload_length=99, content_length=100, complete=True)


def test_upload_limit_header() -> None:
    limits = iv.UploadLimits(max_size=1000, max_age=60)
    assert limits.header(iv.VERSIONS[8]) == "max-size=1000, min-size=0, max-age=60"
    assert limits.header(iv.VERSIONS[6]) == "max-size=1000, min-size=0, expires=60"
    assert iv.UploadLimits(max_size=5).header(iv.CURRENT) == "max-size=5, min-size=0"


# -- Content-Disposition -------------------------------------------------------------


@pytest.mark.parametrize(("header", "name"), [
    ('inline; filename="file name.jpg"', "file name.jpg"),
    ("attachment; filename=plain.txt", "plain.txt"),
    ('inline; filename="a.jpg"; filename*=UTF-8\'\'%C3%A9t%C3%A9.jpg', "été.jpg"),
    ("inline; filename*=iso-8859-1'en'%E9.txt", "é.txt"),
    ('inline; filename="dir/sub/x.bin"', "x.bin"),
    ('inline; filename="..\\\\..\\\\win.ini"', "win.ini"),
    ('inline; filename="quoted \\"q\\".txt"', 'quoted "q".txt'),
    ("inline", None),
    ('inline; filename=""', None),
    ('inline; filename="a/"', None),
    ("inline; filename*=UTF-8''%FF", None),
    ("inline; filename", None),
    (";;;", None),
])
def test_filenames(header: str, name: str | None) -> None:
    assert filename_of(header) == name


# -- RFC 9530 digests ----------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_content_digest_check() -> None:
    body = b"hello, world"
    check = content_check(f"sha-256=:{b64(hashlib.sha256(body).digest())}:, unixsum=:AA==:")
    assert check is not None
    check.update(body[:5])
    check.update(body[5:])
    check.verify()
    wrong = content_check(f"sha-512=:{b64(hashlib.sha512(b'x').digest())}:")
    assert wrong is not None
    wrong.update(body)
    with pytest.raises(ChecksumMismatch):
        wrong.verify()


def test_unsupported_or_malformed_digests() -> None:
    assert content_check("md5=:AAAAAAAAAAAAAAAAAAAAAA==:") is None
    assert content_check(None) is None
    with pytest.raises(BadRequest):
        parse_digests("sha-256=:AQID:", "Content-Digest")  # 3 bytes, not 32
    with pytest.raises(BadRequest):
        parse_digests("sha-256=:not base64!:", "Content-Digest")


def test_repr_digest_crc32c() -> None:
    crc = google_crc32c.value(b"object")
    header = repr_digest_header(crc)
    assert repr_crc32c(header) == crc.to_bytes(4, "big")
    assert repr_crc32c(f"sha-256=:{b64(bytes(32))}:") is None
