"""Pure wire-format helpers: Content-Range, Range, names and part arithmetic.

Nothing here does I/O or imports aiohttp, so it is tested table-driven.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.errors import InvalidContentRange, InvalidName, TooLarge

#: Name segment under which the service keeps its own session records and
#: staged data. Client names may not start with it.
RESERVED_PREFIX = ".uploads"

MAX_NAME_BYTES = 1024
MAX_PARTS = 10_000
MIB = 1024 * 1024
#: S3's smallest part (all but the last), its largest part and largest object.
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * 1024 * MIB
MAX_OBJECT_SIZE = 5 * 1024 * 1024 * MIB


@dataclass(frozen=True)
class Probe:
    """``Content-Range: bytes */*`` or ``bytes */T``: ask how much is stored."""

    total: int | None


@dataclass(frozen=True)
class Chunk:
    """``Content-Range: bytes a-b/T`` or ``bytes a-b/*``; ``end`` is inclusive."""

    start: int
    end: int
    total: int | None

    @property
    def length(self) -> int:
        return self.end - self.start + 1


_NUM = r"(0|[1-9][0-9]{0,18})"
_RANGE_RE = re.compile(rf"bytes {_NUM}-{_NUM}/(\*|{_NUM})")
_PROBE_RE = re.compile(rf"bytes \*/(\*|{_NUM})")


def parse_content_range(value: str) -> Probe | Chunk:
    """Parse a request ``Content-Range`` header; anything malformed raises 400."""
    text = value.strip()
    probe = _PROBE_RE.fullmatch(text)
    if probe:
        return Probe(total=None if probe.group(1) == "*" else int(probe.group(1)))
    match = _RANGE_RE.fullmatch(text)
    if not match:
        raise InvalidContentRange(
            f"malformed Content-Range {value!r}: expected 'bytes a-b/total', "
            "'bytes a-b/*', 'bytes */total' or 'bytes */*'"
        )
    start, end = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if end < start:
        raise InvalidContentRange(f"Content-Range {value!r} ends before it starts")
    if total is not None and end >= total:
        raise InvalidContentRange(f"Content-Range {value!r} reaches past the total size")
    return Chunk(start=start, end=end, total=total)


def format_range(offset: int) -> str | None:
    """The ``Range`` header of a 308 for ``offset`` stored bytes, or None when 0."""
    return f"bytes=0-{offset - 1}" if offset > 0 else None


def format_content_range_total(total: int | None) -> str:
    return "*" if total is None else str(total)


def parse_length(value: str | None, header: str) -> int | None:
    """Parse a non-negative decimal header such as Content-Length."""
    if value is None:
        return None
    text = value.strip()
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", text):
        raise InvalidContentRange(f"{header} must be a non-negative integer, got {value!r}")
    return int(text)


def validate_name(name: str) -> str:
    """Check an upload name (already percent-decoded) and return it unchanged."""
    if not name:
        raise InvalidName("the upload name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidName(f"the upload name is longer than {MAX_NAME_BYTES} UTF-8 bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise InvalidName("the upload name contains control characters")
    if name.startswith("/"):
        raise InvalidName("the upload name must not start with '/'")
    segments = name.split("/")
    if any(s in (".", "..") for s in segments):
        raise InvalidName("the upload name must not contain '.' or '..' segments")
    if any(s == "" for s in segments):
        raise InvalidName("the upload name must not contain empty segments ('//', trailing '/')")
    if segments[0] == RESERVED_PREFIX:
        raise InvalidName(f"names under '{RESERVED_PREFIX}/' are reserved for the service")
    return name


#: Sessions addressed by an upload id (Google's JSON API, tus, the IETF draft)
#: live under this internal name, not the object's: several sessions may aim
#: at one object, and the last to finish wins, as in Google Cloud Storage.
ID_SESSION_PREFIX = f"{RESERVED_PREFIX}/ids/"
_ID_SESSION = re.compile(re.escape(ID_SESSION_PREFIX) + r"[a-z0-9]{1,16}/[A-Za-z0-9_-]{16,128}")


def id_session_name(dialect: str, upload_id: str) -> str:
    """The internal name of the session that ``upload_id`` addresses."""
    name = f"{ID_SESSION_PREFIX}{dialect}/{upload_id}"
    if not _ID_SESSION.fullmatch(name):
        raise InvalidName("malformed upload id")
    return name


def is_id_session_name(name: str) -> bool:
    return _ID_SESSION.fullmatch(name) is not None


def validate_session_name(name: str) -> str:
    """A session's name: an object name, or an id session's internal name."""
    return name if is_id_session_name(name) else validate_name(name)


def choose_part_size(total: int | None, default: int) -> int:
    """Part size P for a new upload: ``default`` unless the total needs more than
    10,000 parts, then the smallest whole MiB that fits."""
    if total is not None and total > MAX_OBJECT_SIZE:
        raise TooLarge(f"{total} bytes is more than the largest object S3 holds (5 TiB)")
    if total is None or total <= default * MAX_PARTS:
        return default
    needed = -(-total // MAX_PARTS)
    part = -(-needed // MIB) * MIB
    if part > MAX_PART_SIZE:
        raise TooLarge(f"{total} bytes is more than S3's largest object allows")
    return part
