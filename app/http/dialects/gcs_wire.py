"""Pure parsing for Google's JSON API uploads: session ranges, the object
resource a client sends, and ``multipart/related`` bodies.

Nothing here does I/O or imports aiohttp, so it is tested table-driven
(``tests/gcs/test_gcs_wire.py``). Our own dialect keeps its stricter
``app.core.protocol.parse_content_range``; only Google's sessions also take
the streamed ``bytes a-*/T`` and ``bytes a-*/*`` forms.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.core.protocol import Chunk, Probe, parse_content_range
from app.errors import BadRequest, InvalidContentRange

_NUM = r"(0|[1-9][0-9]{0,18})"
_OPEN_RE = re.compile(rf"bytes {_NUM}-\*/(\*|{_NUM})")


@dataclass(frozen=True)
class OpenChunk:
    """``bytes a-*/T`` or ``bytes a-*/*``: a body of unknown length from ``start``."""

    start: int
    total: int | None


def parse_session_range(value: str) -> Probe | Chunk | OpenChunk:
    """Every ``Content-Range`` form Google's clients send to a session."""
    match = _OPEN_RE.fullmatch(value.strip())
    if match is None:
        return parse_content_range(value)
    start = int(match.group(1))
    total = None if match.group(2) == "*" else int(match.group(2))
    if total is not None and start > total:
        raise InvalidContentRange(f"Content-Range {value!r} starts past the total size")
    return OpenChunk(start=start, total=total)


# -- the object resource a client sends ----------------------------------------


@dataclass(frozen=True)
class ObjectRequest:
    """The fields of a client's object resource that this service uses."""

    name: str | None = None
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    crc32c: bytes | None = None
    md5: bytes | None = None


def parse_object_json(raw: bytes) -> ObjectRequest:
    """An initiation or multipart metadata body (empty means no fields)."""
    if not raw.strip():
        return ObjectRequest()
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the object metadata must be a JSON object") from None
    if not isinstance(doc, dict):
        raise BadRequest("the object metadata must be a JSON object")
    name = _optional_str(doc, "name")
    content_type = _optional_str(doc, "contentType")
    return ObjectRequest(
        name=name or None,
        content_type=content_type or None,
        metadata=_metadata(doc.get("metadata")),
        crc32c=_digest(doc, "crc32c", 4),
        md5=_digest(doc, "md5Hash", 16),
    )


def _optional_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    return value


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("'metadata' must be an object of strings")
    out: dict[str, str] = {}
    for key, item in value.items():
        # GCS keeps custom metadata as strings; clients may send numbers or
        # booleans (JSON-encoded by hand), which GCS stores in their text form.
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif isinstance(item, int | float):
            item = str(item)
        if not isinstance(item, str):
            raise BadRequest(f"metadata {key!r} must be a string")
        out[str(key)] = item
    return out


def _digest(doc: Mapping[str, Any], key: str, size: int) -> bytes | None:
    value = _optional_str(doc, key)
    if value is None:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise BadRequest(f"'{key}' must be base64") from None
    if len(raw) != size:
        raise BadRequest(f"'{key}' must be {size} bytes once base64-decoded")
    return raw


# -- multipart/related ---------------------------------------------------------

_BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;,"]{1,70}))', re.IGNORECASE)


def multipart_boundary(content_type: str | None) -> str:
    """The boundary of a ``multipart/related`` Content-Type."""
    if content_type is None or not content_type.lower().startswith("multipart/related"):
        raise BadRequest(
            "uploadType=multipart needs 'Content-Type: multipart/related; boundary=...'"
        )
    match = _BOUNDARY_RE.search(content_type)
    if match is None:
        raise BadRequest("the multipart/related Content-Type has no boundary")
    return match.group(1) or match.group(2)


@dataclass(frozen=True)
class MultipartHead:
    """The metadata part and the media part's headers, and where media begins."""

    metadata: ObjectRequest
    media_type: str | None
    #: Bytes of the buffer before the media part's first byte.
    consumed: int


def parse_multipart_head(buf: bytes, boundary: str) -> MultipartHead | None:
    """Parse up to the media part's first byte; None: more bytes are needed.

    Lines may end in CRLF or a bare LF (gcsfs writes bare LF)."""
    dash = b"--" + boundary.encode("latin-1")
    if buf.startswith(dash):
        start = 0
    else:
        # A preamble may come first; the caller bounds how long it may be.
        start = buf.find(b"\n" + dash) + 1
        if start == 0:
            return None
    pos = _after_line(buf, start + len(dash))
    if pos is None:
        return None
    first = _part_headers(buf, pos)
    if first is None:
        return None
    json_headers, pos = first
    json_type = json_headers.get("content-type", "application/json")
    if not json_type.lower().startswith("application/json"):
        raise BadRequest("the first part of a multipart upload must be the JSON metadata")
    end = buf.find(b"\n" + dash, pos)
    if end < 0:
        return None
    raw_json = buf[pos:end].removesuffix(b"\r")
    pos = end + 1 + len(dash)
    if buf[pos : pos + 2] == b"--":
        raise BadRequest("the multipart upload has no media part")
    pos = _after_line(buf, pos)
    if pos is None:
        return None
    second = _part_headers(buf, pos)
    if second is None:
        return None
    media_headers, pos = second
    return MultipartHead(
        metadata=parse_object_json(raw_json),
        media_type=media_headers.get("content-type"),
        consumed=pos,
    )


def _malformed(why: str) -> MultipartHead:
    raise BadRequest(f"malformed multipart/related body: {why}")


def _after_line(buf: bytes, pos: int) -> int | None:
    """Skip the end of a boundary line (optional spaces, CRLF or LF)."""
    newline = buf.find(b"\n", pos)
    if newline < 0:
        return None
    if buf[pos:newline].rstrip(b"\r").strip(b" \t"):
        _malformed("unexpected bytes after a boundary")
    return newline + 1


def _part_headers(buf: bytes, pos: int) -> tuple[dict[str, str], int] | None:
    headers: dict[str, str] = {}
    while True:
        newline = buf.find(b"\n", pos)
        if newline < 0:
            return None
        line = buf[pos:newline].removesuffix(b"\r")
        pos = newline + 1
        if not line:
            return headers, pos
        key, sep, value = line.partition(b":")
        if not sep:
            _malformed(f"bad part header {line[:80]!r}")
        headers[key.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")


class MediaSplitter:
    """Finds the end of the media part in a stream of body bytes.

    ``feed`` returns the media bytes that are certainly not part of the closing
    delimiter (``CRLF--boundary`` or ``LF--boundary``); a short tail is held
    back until the next bytes show whether it starts the delimiter."""

    def __init__(self, boundary: str) -> None:
        self._delimiter = b"\n--" + boundary.encode("latin-1")
        self._held = b""
        self.finished = False
        #: Bytes seen after the delimiter (``--`` closes the body).
        self.trailer = b""

    def feed(self, data: bytes) -> bytes:
        if self.finished:
            self.trailer = (self.trailer + data)[:2]
            return b""
        buf = self._held + data
        end = buf.find(self._delimiter)
        if end >= 0:
            self.finished = True
            self.trailer = buf[end + len(self._delimiter) :][:2]
            self._held = b""
            return buf[:end].removesuffix(b"\r")
        # A partial delimiter at the end is at most len - 1 bytes, plus a CR.
        keep = len(self._delimiter)
        self._held = buf[-keep:]
        return buf[:-keep] if len(buf) > keep else b""

    def check_closed(self) -> None:
        """After the body ended: the delimiter came and closed the body."""
        if not self.finished:
            raise BadRequest("the multipart body ended before its closing boundary")
        if self.trailer and self.trailer != b"--"[: len(self.trailer)]:
            raise BadRequest("a multipart upload has exactly two parts: metadata, then media")
