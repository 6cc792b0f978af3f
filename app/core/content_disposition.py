"""The file name in a ``Content-Disposition`` header (RFC 6266), which the
resumable-upload draft suggests for naming an upload.

``filename*`` (RFC 8187: ``UTF-8''file%20name.jpg``) wins over ``filename``.
Only the last path segment is kept, as RFC 6266 section 4.3 asks of
recipients, so a client cannot aim outside the prefix its uploads go under.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = re.compile(rf"\s*;\s*({_TOKEN})\s*=\s*({_TOKEN}|{_QUOTED})\s*")
_TYPE = re.compile(rf"\s*({_TOKEN})\s*")
_EXT_VALUE = re.compile(r"(?i)(utf-8|iso-8859-1)'[^']*'([!#$&+.^_`|~0-9A-Za-z%-]*)")


def filename_of(value: str) -> str | None:
    """The file name the header names, or None (no name, or a malformed header)."""
    match = _TYPE.match(value)
    if match is None:
        return None
    params: dict[str, str] = {}
    pos = match.end()
    while pos < len(value):
        param = _PARAM.match(value, pos)
        if param is None:
            return None
        raw = param.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(param.group(1).lower(), raw)
        pos = param.end()
    name = _decode_ext(params["filename*"]) if "filename*" in params else None
    if name is None:
        name = params.get("filename")
    if name is None:
        return None
    name = re.split(r"[/\\]", name)[-1].strip()
    return name or None


def _decode_ext(value: str) -> str | None:
    match = _EXT_VALUE.fullmatch(value)
    if match is None:
        return None
    charset = "utf-8" if match.group(1).lower() == "utf-8" else "latin-1"
    try:
        return unquote_to_bytes(match.group(2)).decode(charset)
    except UnicodeDecodeError:
        return None
