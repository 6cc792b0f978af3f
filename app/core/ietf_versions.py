"""What differs between the interop versions of the IETF resumable-upload
draft (draft-ietf-httpbis-resumable-upload) that shipped clients speak.

A client names its version in ``Upload-Draft-Interop-Version``; everything the
HTTP layer does differently per version is a field of ``InteropVersion``, read
from the draft text of that version:

==== ============ ====================================================
 3    -01          iOS 17 ``URLSession``: ``Upload-Incomplete`` (inverted)
 4    -02          ``Upload-Complete`` replaces it; HEAD answers 204
 5    -03          tus-js-client ``ietf-draft-03``; HEAD may answer 200
 6    -04, -05     tus-js-client ``ietf-draft-05``: PATCH must be
                   ``application/partial-upload``; ``Upload-Limit`` with
                   ``expires``; ``Upload-Length``; problem types
 7    -06 .. -08   ``max-age`` replaces ``expires``; append answers need
                   no ``Upload-Offset``; HEAD/DELETE may carry the fields
 8    -09 ..       the current draft (iOS 26 sends it); a completed
                   upload's final answer may be replayed
==== ============ ====================================================

Pure: no I/O, no HTTP library; tested table-driven.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from app.core.structured_fields import (
    parse_boolean,
    parse_integer,
    parse_non_negative,
    serialize_integer_dictionary,
)

INTEROP_HEADER = "Upload-Draft-Interop-Version"
PARTIAL_UPLOAD = "application/partial-upload"

_PROBLEMS = "https://iana.org/assignments/http-problem-types#"
MISMATCHING_OFFSET = _PROBLEMS + "mismatching-upload-offset"
INCONSISTENT_LENGTH = _PROBLEMS + "inconsistent-upload-length"
COMPLETED_UPLOAD = _PROBLEMS + "completed-upload"


class FieldError(ValueError):
    """A draft header field is missing, malformed or not allowed here."""


@dataclass(frozen=True)
class InteropVersion:
    number: int
    #: The draft revisions that define this interop version.
    drafts: str
    #: ``Upload-Complete`` (True means complete) or, in -01, ``Upload-Incomplete``.
    complete_field: str
    #: PATCH must carry ``Content-Type: application/partial-upload``.
    needs_partial_upload_type: bool
    #: ``Upload-Limit`` exists (creation, HEAD, OPTIONS, 413 answers).
    has_limits: bool
    #: Key of the remaining lifetime in ``Upload-Limit`` (``expires`` in -05).
    age_key: str
    #: Status of a successful append that leaves the upload incomplete.
    append_status: int
    #: Header fields a HEAD or DELETE must not carry (400 if it does).
    forbidden_on_probe: frozenset[str]
    #: An append to a completed upload at its final offset, with no content,
    #: replays the final answer; otherwise it is refused (completed-upload).
    replays_completion: bool
    #: An append that does not say whether it completes the upload is
    #: refused (True), or taken as the last one (False: "absent" meant complete).
    requires_complete_on_append: bool

    def read_complete(self, headers: Mapping[str, str]) -> bool | None:
        """Whether the request says it carries the end of the upload; None if
        it does not say."""
        raw = headers.get(self.complete_field)
        if raw is None:
            return None
        try:
            value = parse_boolean(raw)
        except ValueError as exc:
            raise FieldError(f"{self.complete_field}: {exc}") from None
        return not value if self.complete_field == "Upload-Incomplete" else value

    def complete_headers(self, complete: bool) -> dict[str, str]:
        if self.complete_field == "Upload-Incomplete":
            return {"Upload-Incomplete": "?0" if complete else "?1"}
        return {"Upload-Complete": "?1" if complete else "?0"}

    def check_probe_fields(self, headers: Mapping[str, str]) -> None:
        for name in sorted(self.forbidden_on_probe):
            if name in headers:
                raise FieldError(
                    f"interop version {self.number} forbids {name} on HEAD and DELETE"
                )


_EARLY = frozenset({"Upload-Offset"})

VERSIONS: Mapping[int, InteropVersion] = MappingProxyType({
    v.number: v
    for v in (
        InteropVersion(3, "-01", "Upload-Incomplete", False, False, "max-age", 201,
                       _EARLY | {"Upload-Incomplete"}, True, False),
        InteropVersion(4, "-02", "Upload-Complete", False, False, "max-age", 201,
                       _EARLY | {"Upload-Complete"}, False, False),
        InteropVersion(5, "-03", "Upload-Complete", False, False, "max-age", 201,
                       _EARLY | {"Upload-Complete"}, False, False),
        InteropVersion(6, "-04, -05", "Upload-Complete", True, True, "expires", 201,
                       _EARLY | {"Upload-Complete", "Upload-Length"}, False, False),
        InteropVersion(7, "-06 to -08", "Upload-Complete", True, True, "max-age", 204,
                       frozenset(), False, True),
        InteropVersion(8, "-09 and later", "Upload-Complete", True, True, "max-age", 204,
                       frozenset(), True, True),
    )
})
CURRENT = VERSIONS[max(VERSIONS)]


def negotiate(value: str) -> InteropVersion:
    """The version a request's ``Upload-Draft-Interop-Version`` names."""
    try:
        number = parse_integer(value)
    except ValueError:
        raise FieldError(f"{INTEROP_HEADER} must be an integer, got {value!r}") from None
    version = VERSIONS.get(number)
    if version is None:
        served = ", ".join(str(n) for n in sorted(VERSIONS))
        raise FieldError(
            f"interop version {number} is not served here; served versions: {served}"
        )
    return version


def read_offset(headers: Mapping[str, str]) -> int | None:
    return _read_non_negative(headers, "Upload-Offset")


def read_length(headers: Mapping[str, str]) -> int | None:
    return _read_non_negative(headers, "Upload-Length")


def _read_non_negative(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return parse_non_negative(raw)
    except ValueError as exc:
        raise FieldError(f"{name}: {exc}") from None


def stated_total(
    *, offset: int, upload_length: int | None, content_length: int | None, complete: bool
) -> int | None:
    """The upload's length as one request states it: ``Upload-Length``, and
    ``offset + Content-Length`` when the request completes the upload. Both
    present must agree (the draft's inconsistent-upload-length problem)."""
    implied = offset + content_length if complete and content_length is not None else None
    if upload_length is not None and implied is not None and upload_length != implied:
        raise InconsistentLength(
            f"Upload-Length says {upload_length} bytes but this request completes the "
            f"upload at {implied} bytes"
        )
    return upload_length if upload_length is not None else implied


class InconsistentLength(FieldError):
    """Two length indications of one upload disagree."""


@dataclass(frozen=True)
class UploadLimits:
    max_size: int
    #: Remaining lifetime in seconds; None: not announced.
    max_age: int | None = None
    min_size: int = 0

    def header(self, version: InteropVersion) -> str:
        members = [("max-size", self.max_size), ("min-size", self.min_size)]
        if self.max_age is not None:
            members.append((version.age_key, max(0, self.max_age)))
        return serialize_integer_dictionary(members)
