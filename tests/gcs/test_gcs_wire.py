"""Table-driven tests of the GCS dialect's pure parsing and rendering."""

from __future__ import annotations

import base64
import hashlib

import pytest

from app.core.model import CompletedObject, UploadInfo
from app.core.protocol import Chunk, Probe, parse_content_range
from app.errors import BadRequest, InvalidContentRange, TooLarge, UploadNotFound
from app.http.dialects import gcs_render
from app.http.dialects.gcs_wire import (
    MediaSplitter,
    ObjectRequest,
    OpenChunk,
    multipart_boundary,
    parse_multipart_head,
    parse_object_json,
    parse_session_range,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes 0-262143/1000000", Chunk(0, 262143, 1000000)),
        ("bytes 262144-524287/*", Chunk(262144, 524287, None)),
        ("bytes */1000000", Probe(1000000)),
        ("bytes */*", Probe(None)),
        ("bytes 0-*/*", OpenChunk(0, None)),
        ("bytes 5-*/*", OpenChunk(5, None)),
        ("bytes 7-*/100", OpenChunk(7, 100)),
        ("bytes 100-*/100", OpenChunk(100, 100)),
        (" bytes 0-*/* ", OpenChunk(0, None)),
    ],
)
def test_session_ranges(header: str, expected: object) -> None:
    assert parse_session_range(header) == expected


@pytest.mark.parametrize(
    "header",
    ["bytes 101-*/100", "bytes -*/*", "bytes 01-*/*", "bytes a-*/*", "bytes 0-*", "bytes *-*/*",
     "bytes 5-4/10", "bytes 0-10/10", "items 0-*/*"],
)
def test_bad_session_ranges(header: str) -> None:
    with pytest.raises(InvalidContentRange):
        parse_session_range(header)


@pytest.mark.parametrize("header", ["bytes 0-*/*", "bytes 3-*/10"])
def test_our_dialect_still_refuses_open_ranges(header: str) -> None:
    with pytest.raises(InvalidContentRange):
        parse_content_range(header)


MD5 = base64.b64encode(hashlib.md5(b"x").digest()).decode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", ObjectRequest()),
        (b"  ", ObjectRequest()),
        (b'{"name": "a/b.txt"}', ObjectRequest(name="a/b.txt")),
        (b'{"name": "", "contentType": ""}', ObjectRequest()),
        (b'{"contentType": "text/plain", "metadata": {"k": "v", "n": 3, "b": true}}',
         ObjectRequest(content_type="text/plain", metadata={"k": "v", "n": "3", "b": "true"})),
        (b'{"crc32c": "AAAAAQ==", "md5Hash": "' + MD5.encode() + b'"}',
         ObjectRequest(crc32c=b"\0\0\0\1", md5=hashlib.md5(b"x").digest())),
        (b'{"metadata": null}', ObjectRequest()),
    ],
)
def test_object_json(raw: bytes, expected: ObjectRequest) -> None:
    assert parse_object_json(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [b"[]", b"{", b'{"name": 3}', b'{"metadata": []}', b'{"metadata": {"k": {}}}',
     b'{"crc32c": "!!"}', b'{"crc32c": "AAAA"}', b'{"md5Hash": "AAAAAQ=="}'],
)
def test_bad_object_json(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_object_json(raw)


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ('multipart/related; boundary="==0=="', "==0=="),
        ("multipart/related; boundary===============123==", "==============123=="),
        ("Multipart/Related; charset=x; BOUNDARY=abc", "abc"),
    ],
)
def test_boundaries(content_type: str, boundary: str) -> None:
    assert multipart_boundary(content_type) == boundary


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "multipart/related", "multipart/form-data; boundary=a"],
)
def test_bad_boundaries(content_type: str | None) -> None:
    with pytest.raises(BadRequest):
        multipart_boundary(content_type)


def body(newline: bytes, media: bytes, *, preamble: bytes = b"", end: bytes = b"--") -> bytes:
    nl = newline
    return (
        preamble + b"--BND" + nl + b"Content-Type: application/json; charset=UTF-8" + nl + nl
        + b'{"name": "n.bin", "metadata": {"a": "1"}}' + nl + b"--BND" + nl
        + b"Content-Type: image/png" + nl + nl + media + nl + b"--BND" + end
    )


MEDIA = b"\x89PNG\r\n--BN\n--BNX\r\n" + bytes(range(256)) * 40


@pytest.mark.parametrize("newline", [b"\r\n", b"\n"], ids=["crlf", "bare-lf"])
@pytest.mark.parametrize("step", [1, 7, 64, 100_000])
def test_multipart_split_at_every_chunking(newline: bytes, step: int) -> None:
    """Head and media found whatever the read boundaries, CRLF or bare LF,
    with media that contains near-delimiters."""
    raw = body(newline, MEDIA, preamble=b"preamble" + newline)
    buf, pos = b"", 0
    head = None
    while head is None:
        buf += raw[pos : pos + step]
        pos += step
        head = parse_multipart_head(buf, "BND")
    assert head.metadata == ObjectRequest(name="n.bin", metadata={"a": "1"})
    assert head.media_type == "image/png"
    splitter = MediaSplitter("BND")
    out = splitter.feed(buf[head.consumed :])
    while pos < len(raw):
        out += splitter.feed(raw[pos : pos + step])
        pos += step
    assert out == MEDIA
    splitter.check_closed()


@pytest.mark.parametrize(
    "raw",
    [
        b"--BND\r\nContent-Type: text/plain\r\n\r\n{}\r\n--BND\r\n\r\nx\r\n--BND--",
        b"--BND\r\n\r\n{}\r\n--BND--",
        b"--BNDjunk\r\n\r\n{}\r\n--BND\r\n\r\nx",
        b"--BND\r\nno-colon\r\n\r\n{}\r\n--BND\r\n\r\nx",
        b"--BND\r\n\r\n[1]\r\n--BND\r\n\r\nx",
    ],
)
def test_bad_multipart_heads(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_multipart_head(raw, "BND")


def test_no_opening_boundary_yet_means_more_bytes() -> None:
    # The handler refuses past 64 KiB without one.
    assert parse_multipart_head(b"xx--BND\r\n" + b"x" * 1000, "BND") is None


def test_multipart_head_waits_for_more_bytes() -> None:
    raw = body(b"\r\n", b"x")
    head = parse_multipart_head(raw, "BND")
    assert head is not None
    for cut in range(head.consumed):
        assert parse_multipart_head(raw[:cut], "BND") is None, cut


@pytest.mark.parametrize(
    ("tail", "error"),
    [(b"", "ended before"), (b"\r\n--BND\r\nContent-Type: x\r\n\r\nmore", "exactly two parts")],
)
def test_media_that_does_not_close(tail: bytes, error: str) -> None:
    splitter = MediaSplitter("BND")
    splitter.feed(b"media" + tail)
    with pytest.raises(BadRequest, match=error):
        splitter.check_closed()


# -- rendering ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (BadRequest("bad"), 400, "invalid"),
        (UploadNotFound("gone"), 404, "notFound"),
        (TooLarge("big"), 413, "uploadTooLarge"),
    ],
)
def test_error_shape(error: Exception, status: int, reason: str) -> None:
    doc = gcs_render.error_of(error)  # type: ignore[arg-type]
    assert doc == {"error": {"code": status, "message": str(error), "errors": [
        {"reason": reason, "message": str(error), "domain": "global"}]}}


def test_object_resource() -> None:
    done = CompletedObject(key="media/a b.txt", bucket="/srv/data", size=11, etag='"e"',
                           crc32c=1, completed_at=1_700_000_000.25,
                           md5=hashlib.md5(b"x").digest())
    info = UploadInfo(name=".uploads/ids/gcs/" + "A" * 32, session_id="s", offset=11, total=11,
                      part_size=1, crc32c=1, content_type="text/plain", metadata={"k": "v"},
                      completed=done, target="media/a b.txt")
    doc = gcs_render.object_resource(info, bucket="media", name="a b.txt",
                                     base="http://h:1")
    assert doc == {
        "kind": "storage#object",
        "id": "media/a b.txt/1700000000250000",
        "selfLink": "http://h:1/storage/v1/b/media/o/a%20b.txt",
        "mediaLink": "http://h:1/download/storage/v1/b/media/o/a%20b.txt"
                     "?generation=1700000000250000&alt=media",
        "name": "a b.txt",
        "bucket": "media",
        "generation": "1700000000250000",
        "metageneration": "1",
        "contentType": "text/plain",
        "storageClass": "STANDARD",
        "size": "11",
        "crc32c": "AAAAAQ==",
        "md5Hash": MD5,
        "etag": doc["etag"],
        "timeCreated": "2023-11-14T22:13:20.250Z",
        "updated": "2023-11-14T22:13:20.250Z",
        "timeStorageClassUpdated": "2023-11-14T22:13:20.250Z",
        "timeFinalized": "2023-11-14T22:13:20.250Z",
        "metadata": {"k": "v"},
    }
    # Nothing of the server's disk layout leaks into what clients see.
    assert "/srv/data" not in str(doc)
    assert doc["etag"] and '"' not in doc["etag"]
