"""Pure parsing and formatting of tus 1.0 headers: Upload-Metadata,
Upload-Checksum, Upload-Concat, lengths and offsets. No I/O, no aiohttp."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import urlsplit

from app.core.checksums import RequestChecksum
from app.errors import BadRequest, UploadError

TUS_VERSION = "1.0.0"

#: Keys as S3 object metadata can carry them (HTTP header tokens).
_KEY = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_NUMBER = re.compile(r"0|[1-9][0-9]{0,18}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
#: Most partial uploads a final upload may join (their ids are recorded with it).
MAX_PARTIALS = 32
#: Metadata keys this dialect keeps for itself (never echoed to clients).
CONCAT_KEY = "tus-concat"


class UnsupportedMediaType(UploadError):
    status = 415
    code = "unsupported_media_type"


class VersionMismatch(UploadError):
    """``Tus-Resumable`` names a version this server does not speak."""

    status = 412
    code = "precondition_failed"

    def headers(self) -> dict[str, str]:
        return {"Tus-Version": TUS_VERSION}


def check_version(value: str | None) -> None:
    if value is None:
        raise VersionMismatch("the Tus-Resumable header is missing; this server speaks 1.0.0")
    if value.strip() != TUS_VERSION:
        raise VersionMismatch(f"Tus-Resumable {value!r} is not supported; use 1.0.0")


def parse_number(value: str | None, header: str) -> int | None:
    if value is None:
        return None
    if not _NUMBER.fullmatch(value.strip()):
        raise BadRequest(f"{header} must be a non-negative integer, got {value!r}")
    return int(value.strip())


def parse_metadata(value: str | None) -> dict[str, str]:
    """``key base64,key2 base64,key3``; values must be UTF-8 text once decoded."""
    found: dict[str, str] = {}
    if value is None or not value.strip():
        return found
    for item in value.split(","):
        parts = item.strip().split(" ")
        if len(parts) > 2 or not parts[0]:
            raise BadRequest(f"malformed Upload-Metadata item {item.strip()!r}: "
                             "expected 'key base64value'")
        key = parts[0]
        if not _KEY.fullmatch(key):
            raise BadRequest(f"Upload-Metadata key {key!r} must be an ASCII token")
        if key in found or key == CONCAT_KEY:
            raise BadRequest(f"Upload-Metadata key {key!r} is repeated or reserved")
        raw = parts[1] if len(parts) == 2 else ""
        if not _BASE64.fullmatch(raw):
            raise BadRequest(f"Upload-Metadata value of {key!r} is not base64")
        try:
            found[key] = base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest(
                f"Upload-Metadata value of {key!r} must be base64 of UTF-8 text"
            ) from None
    return found


def format_metadata(metadata: Mapping[str, str]) -> str:
    return ",".join(
        f"{key} {base64.b64encode(value.encode('utf-8')).decode('ascii')}" if value else key
        for key, value in metadata.items()
        if key != CONCAT_KEY
    )


def parse_checksum(value: str | None) -> RequestChecksum | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``."""
    if value is None:
        return None
    parts = value.strip().split(" ")
    if len(parts) != 2:
        raise BadRequest("Upload-Checksum must be '<algorithm> <base64 digest>'")
    algorithm, encoded = parts[0].lower(), parts[1]
    try:
        expected = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise BadRequest("the Upload-Checksum digest is not valid base64") from None
    return RequestChecksum(algorithm, expected)


@dataclass(frozen=True)
class Concat:
    """``Upload-Concat``: ``partial``, or ``final`` with the partials' upload ids."""

    final: bool
    ids: tuple[str, ...] = ()


def parse_concat(value: str | None, base_path: str) -> Concat | None:
    """``partial`` or ``final;<url> <url>...``; each URL (absolute or a path)
    must address an upload under ``base_path``."""
    if value is None:
        return None
    text = value.strip()
    if text == "partial":
        return Concat(final=False)
    kind, sep, urls = text.partition(";")
    if kind.strip() != "final" or not sep:
        raise BadRequest("Upload-Concat must be 'partial' or 'final;<url> <url>...'")
    ids = tuple(upload_id_of(url, base_path) for url in urls.split())
    if not ids:
        raise BadRequest("Upload-Concat: final names no partial uploads")
    if len(ids) > MAX_PARTIALS:
        raise BadRequest(f"a final upload may join at most {MAX_PARTIALS} partial uploads")
    return Concat(final=True, ids=ids)


def upload_id_of(url: str, base_path: str) -> str:
    path = urlsplit(url).path
    if not path.startswith(base_path) or "/" in path[len(base_path):]:
        raise BadRequest(f"{url!r} is not an upload of this server (expected {base_path}<id>)")
    upload_id = path[len(base_path):]
    if not upload_id:
        raise BadRequest(f"{url!r} names no upload")
    return upload_id


def concat_record(concat: Concat) -> str:
    """How a session remembers that it is a partial or final upload."""
    return "final;" + " ".join(concat.ids) if concat.final else "partial"


def concat_of(metadata: Mapping[str, str]) -> Concat | None:
    record = metadata.get(CONCAT_KEY)
    if record is None:
        return None
    if record == "partial":
        return Concat(final=False)
    return Concat(final=True, ids=tuple(record.removeprefix("final;").split()))


def http_date(timestamp: float) -> str:
    """RFC 9110 IMF-fixdate, as ``Upload-Expires`` wants it."""
    return formatdate(timestamp, usegmt=True)
