"""The few RFC 9651 structured-field forms the resumable-upload draft and
RFC 9530 digests use: Integer and Boolean items, Dictionaries of Byte
Sequences, and serialising a Dictionary of Integers (``Upload-Limit``).

Only what those fields need is parsed; parameters on an item are accepted and
dropped, since none of the fields defines any. A malformed value raises
``ValueError`` with a reason a client can act on.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

_INTEGER = re.compile(r"-?[0-9]{1,15}")
_KEY = re.compile(r"[a-z*][a-z0-9_.*-]*")
#: Parameters after an item: ``;key`` or ``;key=value`` (values not interpreted).
_PARAMS = re.compile(r"(?:[ ]*;[ ]*[a-z*][a-z0-9_.*-]*(?:=[^;,]*)?)*")


def _split_params(text: str) -> str:
    """The bare item of ``text``, its parameters checked for shape and dropped."""
    bare, sep, rest = text.partition(";")
    if sep and not _PARAMS.fullmatch(sep + rest):
        raise ValueError("malformed parameters")
    return bare.strip(" ")


def parse_integer(value: str) -> int:
    bare = _split_params(value.strip(" \t"))
    if not _INTEGER.fullmatch(bare):
        raise ValueError(f"{value!r} is not a structured-field Integer")
    return int(bare)


def parse_non_negative(value: str) -> int:
    number = parse_integer(value)
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    return number


def parse_boolean(value: str) -> bool:
    bare = _split_params(value.strip(" \t"))
    if bare == "?1":
        return True
    if bare == "?0":
        return False
    raise ValueError(f"{value!r} is not a structured-field Boolean (?0 or ?1)")


def parse_byte_sequence_dictionary(value: str) -> dict[str, bytes]:
    """A Dictionary whose members are Byte Sequences (``sha-256=:b64:``), as
    RFC 9530 digest fields carry; members of other types are skipped (the RFC
    lets a recipient ignore what it cannot use), a malformed one raises."""
    found: dict[str, bytes] = {}
    for member in _members(value):
        key, sep, item = member.partition("=")
        key = key.strip(" ")
        if not _KEY.fullmatch(key):
            raise ValueError(f"malformed dictionary key {key!r}")
        if not sep:
            continue  # a bare key is a Boolean true: not a digest
        bare = _split_params(item)
        if not (len(bare) >= 2 and bare[0] == ":" and bare[-1] == ":"):
            continue
        try:
            found[key] = base64.b64decode(bare[1:-1], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"the value of {key!r} is not valid base64") from None
    return found


def _members(value: str) -> Iterable[str]:
    text = value.strip(" \t")
    if not text:
        raise ValueError("empty dictionary")
    for member in text.split(","):
        member = member.strip(" \t")
        if not member:
            raise ValueError("empty dictionary member")
        yield member


def serialize_integer_dictionary(members: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{key}={value}" for key, value in members)


def serialize_byte_sequence(data: bytes) -> str:
    return ":" + base64.b64encode(data).decode("ascii") + ":"
