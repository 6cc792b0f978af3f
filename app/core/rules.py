"""The session rules: every decision about what a request may do to an upload.

Everything that affects an upload's state is decided here, from the state a
store reported and what a request asks for; the engine and the stores only
carry the decision out. Nothing here does I/O or knows HTTP or S3, so the
rules are tested table-driven without sockets (``tests/core/test_rules.py``).

Two kinds of request change an upload:

* an **append** (``AppendRequest``): bytes from ``start``, of ``length`` if the
  request says, perhaps stating the whole object's ``total``. ``plan_append``
  answers with a ``WritePlan``: how many leading bytes to skip, how many new
  bytes to take at most, the total to settle, and the upload's size limit;
* a **finish**: ``check_finish`` says whether an upload may become its object.

Two modes of append exist because the dialects disagree on resent bytes:

* ``Mode.SKIP_OVERLAP`` (our dialect, Google's): bytes already stored are
  skipped when a client resends them; a start past the offset is a gap;
* ``Mode.EXACT_OFFSET`` (tus, the IETF draft): the request must start at the
  offset exactly; anything else is refused and nothing is stored.

Stores check the same preconditions again under their own lock or conditional
write (``check_write``, ``check_finish``, ``check_cancel``), because another
process may have moved the upload since the engine looked.

An invariant the rules keep: ``total <= part_size * MAX_PARTS``. A total
known at creation picks a part size that fits (``choose_part_size``); the
first write may settle another one that still fits (``aligned_part_size``);
a total settled later must fit the part size fixed by then.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from app.core.model import UploadInfo
from app.core.protocol import (
    MAX_OBJECT_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    choose_part_size,
)
from app.errors import (
    BadRequest,
    DigestMismatch,
    Forbidden,
    LengthMismatch,
    OffsetMismatch,
    TooLarge,
    TotalMismatch,
    UploadExpired,
    UploadNotFound,
)


class Mode(enum.Enum):
    SKIP_OVERLAP = "skip-overlap"
    EXACT_OFFSET = "exact-offset"


@dataclass(frozen=True)
class Limits:
    """Upper bounds on an upload's size besides the store's own."""

    #: ``storage.max_upload_size``.
    configured: int | None = None
    #: What the auth webhook allowed for this request (``max_size``).
    granted: int | None = None


@dataclass(frozen=True)
class AppendRequest:
    """Bytes offered for an upload."""

    #: Offset of the request's first byte in the object.
    start: int
    #: Bytes the request declares; None when it streams until its body ends.
    length: int | None
    #: The whole object's size, when the request states it.
    total: int | None


@dataclass(frozen=True)
class WritePlan:
    """What the engine does with one append's body."""

    #: Leading body bytes already stored (dropped, not written again).
    skip: int
    #: New bytes to store at most; None: until the body ends (within ``limit``).
    length: int | None
    #: A total for the store to settle with this write; None: nothing to settle.
    settle_total: int | None
    #: The most bytes the upload may ever hold.
    limit: int


# -- the engine's side ------------------------------------------------------


def check_declared_size(total: int | None, limits: Limits) -> None:
    """A size stated before anything is created must fit every limit."""
    if total is None:
        return
    if total < 0:
        raise TotalMismatch(f"the total size cannot be negative ({total})")
    for limit, what in (
        (limits.granted, "the size this upload is allowed"),
        (limits.configured, "the maximum upload size"),
        (MAX_OBJECT_SIZE, "the largest object storage can hold"),
    ):
        if limit is not None and total > limit:
            raise TooLarge(f"{total} bytes is more than {what} ({limit} bytes)")


def upload_limit(info: UploadInfo, total: int | None, limits: Limits) -> int:
    """The most bytes ``info`` may ever hold, given the total now known."""
    candidates = [min(MAX_OBJECT_SIZE, info.part_size * MAX_PARTS)]
    if total is not None:
        candidates.append(total)
    candidates.extend(limit for limit in (limits.granted, limits.configured) if limit is not None)
    return min(candidates)


def check_live(info: UploadInfo, *, ttl: float, now: float, owner: str | None) -> None:
    """An upload is usable if it has not expired and belongs to ``owner``
    (an upload or a request without owner binds nobody)."""
    if not info.is_complete and info.updated_at + ttl < now:
        raise UploadExpired(f"the upload {info.name!r} expired after being idle too long")
    if info.owner is not None and owner is not None and info.owner != owner:
        raise Forbidden("this upload belongs to another owner")


def check_replace(object_owner: str | None, owner: str | None, *, allow_replace: bool) -> None:
    """A new upload may replace a finished object only if the owners agree
    (as in ``check_live``, an object or a request without owner binds
    nobody), or the authorizer allowed replacing it."""
    if allow_replace or object_owner is None or owner is None:
        return
    if object_owner != owner:
        raise Forbidden("the object at this name belongs to another owner")


def replacing_owner(info: UploadInfo, owner: str | None, *, allow_replace: bool) -> str | None:
    """The owner a replacement of ``info`` is checked against: ``allow_replace``
    lifts the check for a finished object, never for another's upload in
    progress."""
    return None if allow_replace and info.is_complete else owner


def check_stated_total(info: UploadInfo, total: int | None) -> None:
    """A total stated by a request must agree with the upload's and its bytes."""
    if total is None:
        return
    if info.completed is not None:
        if total != info.completed.size:
            raise TotalMismatch(
                f"the upload was completed with {info.completed.size} bytes, not {total}"
            )
        return
    if info.total is not None and info.total != total:
        raise TotalMismatch(
            f"the upload was declared as {info.total} bytes, not {total}", offset=info.offset
        )
    if info.offset > total:
        raise TotalMismatch(
            f"{info.offset} bytes are already stored, more than {total}", offset=info.offset
        )


def check_completed_digests(info: UploadInfo, crc32c: bytes | None, md5: bytes | None) -> None:
    """A request to a completed upload that states the object's digests must
    state the stored object's: anything else is other bytes, never a 200."""
    done = info.completed
    assert done is not None
    if crc32c is not None and crc32c != done.crc32c.to_bytes(4, "big"):
        raise DigestMismatch(
            "the upload is complete, and its crc32c differs from the one this request states; "
            "to store other bytes, start a new upload"
        )
    if md5 is not None and done.md5 is not None and md5 != done.md5:
        raise DigestMismatch(
            "the upload is complete, and its md5 differs from the one this request states; "
            "to store other bytes, start a new upload"
        )


def check_length(declared: int | None, ranged: int) -> None:
    """A body length stated twice (Content-Length and a range) must agree."""
    if declared is not None and declared != ranged:
        raise LengthMismatch(
            f"Content-Length is {declared} but the range covers {ranged} bytes"
        )


def plan_append(info: UploadInfo, request: AppendRequest, mode: Mode, limits: Limits) -> WritePlan:
    """Decide what to do with an append to the unfinished upload ``info``."""
    assert info.completed is None
    # First, in exact-offset dialects: lengths a request implies from its own
    # offset (IETF ``Upload-Complete: ?1``) mean nothing when that offset is wrong.
    if mode is Mode.EXACT_OFFSET and request.start != info.offset:
        raise OffsetMismatch(
            f"this request starts at byte {request.start} but the upload is at byte "
            f"{info.offset}; resend from byte {info.offset}",
            offset=info.offset,
        )
    check_stated_total(info, request.total)
    total = info.total if request.total is None else request.total
    end = None if request.length is None else request.start + request.length
    if total is not None and end is not None and end > total:
        raise BadRequest(f"the range reaches past the declared total of {total} bytes")
    if request.start > info.offset:
        raise OffsetMismatch(
            f"this chunk starts at byte {request.start} but only {info.offset} bytes are "
            f"stored; resend from byte {info.offset}",
            offset=info.offset,
        )
    skip = info.offset - request.start
    length = None if request.length is None else max(0, request.length - skip)
    skip = skip if request.length is None else min(skip, request.length)
    limit = upload_limit(info, total, limits)
    if length is not None and length > 0 and info.offset + length > limit:
        raise TooLarge(f"the upload would exceed the maximum size of {limit} bytes")
    settle = total if info.total is None and total is not None else None
    if settle is not None:
        check_total_fits(info, settle)
    return WritePlan(skip=skip, length=length, settle_total=settle, limit=limit)


def check_append_to_complete(info: UploadInfo, request: AppendRequest, mode: Mode) -> None:
    """An append to a finished upload changes nothing; in ``EXACT_OFFSET`` mode
    it must still name the offset the upload ended at."""
    assert info.completed is not None
    check_stated_total(info, request.total)
    size = info.completed.size
    if mode is Mode.EXACT_OFFSET and (request.start != size or (request.length or 0) > 0):
        raise OffsetMismatch(
            f"the upload is complete with {size} bytes; nothing more can be appended",
            offset=size,
        )


def ready_to_finish(info: UploadInfo) -> bool:
    """All bytes of a known total are stored: the upload can become its object."""
    return info.completed is None and info.total is not None and info.offset == info.total


# -- the stores' side -------------------------------------------------------


def new_upload(
    name: str,
    *,
    session_id: str,
    total: int | None,
    content_type: str,
    metadata: Mapping[str, str],
    owner: str | None,
    target: str | None,
    default_part_size: int,
    now: float,
) -> UploadInfo:
    """The state of a new, empty upload (its part size chosen for ``total``)."""
    return UploadInfo(
        name=name,
        session_id=session_id,
        offset=0,
        total=total,
        part_size=part_size_for_new(total, default_part_size),
        crc32c=0,
        content_type=content_type,
        metadata=dict(metadata),
        owner=owner,
        created_at=now,
        updated_at=now,
        target=target,
    )


def part_size_for_new(total: int | None, default: int) -> int:
    """The part size of a new upload of ``total`` bytes (None: unknown)."""
    if total is not None and total < 0:
        raise TotalMismatch(f"the total size cannot be negative ({total})")
    return choose_part_size(total, default)


#: Parts settled from a client's chunk size are whole multiples of this: what
#: Google's resumable protocol asks chunks to be, and the granule the S3
#: writer keeps staged remainders in.
PART_GRANULE = 256 * 1024


def aligned_part_size(
    current: int,
    *,
    offset: int,
    length: int | None,
    total: int | None,
    ceiling: int | None,
    largest: int,
) -> int:
    """The part size an upload settles on at its first write: one that makes a
    chunk of that write's ``length`` a whole number of parts, so chunks of
    that size go straight into parts with nothing staged; ``current`` when
    none fits.

    Only a write at ``offset`` 0 may change it: once bytes are laid out in
    parts, every part but the last keeps its size (R2 refuses unequal
    parts). ``length`` is what the write declares (None: it streams); a write
    of the whole object (``length >= total``) is one request whatever the
    part size, so it keeps ``current``, as plain PUTs do. The candidates are
    ``length / k`` for ``k = 1, 2, ...``, the first at most ``largest`` (it
    bounds the part buffers a write holds); each must be at least S3's
    5 MiB, a multiple of ``PART_GRANULE`` and hold in ``MAX_PARTS`` parts the
    total when it is known, else ``ceiling`` (the configured maximum upload
    size), else what ``current`` parts hold already: an upload of unknown size
    never loses room by settling."""
    if offset != 0 or length is None or length <= 0:
        return current
    if total is not None and length >= total:
        return current
    if total is not None:
        needed = total
    elif ceiling is not None:
        needed = ceiling
    else:
        needed = min(current * MAX_PARTS, MAX_OBJECT_SIZE)
    for k in range(max(1, -(-length // largest)), length // MIN_PART_SIZE + 1):
        size, rest = divmod(length, k)
        if rest or size % PART_GRANULE:
            continue
        # Smaller candidates only follow: if this one cannot hold the upload, none can.
        return size if size * MAX_PARTS >= needed else current
    return current


def check_total_fits(info: UploadInfo, total: int) -> None:
    """A total settled after the first write must fit the part size fixed then."""
    if total > info.part_size * MAX_PARTS:
        raise TooLarge(
            f"{total} bytes need more than {MAX_PARTS} parts of {info.part_size} bytes "
            "(the part size is fixed by the upload's first write)"
        )


def settle_total(stored: UploadInfo, total: int | None) -> int | None:
    """The total after a write that states ``total`` (None: states nothing)."""
    if total is None or total == stored.total:
        return stored.total
    if stored.total is not None:
        raise TotalMismatch(
            f"total {total} contradicts the declared total {stored.total} of {stored.name!r}"
        )
    if total < stored.offset:
        raise TotalMismatch(f"total {total} is less than the {stored.offset} bytes already stored")
    check_total_fits(stored, total)
    return total


def check_same_session(stored: UploadInfo, expected: UploadInfo) -> None:
    if stored.session_id != expected.session_id:
        raise OffsetMismatch(
            f"{expected.name!r} was replaced by a new upload holding {stored.offset} bytes",
            offset=stored.offset,
        )


def check_write(stored: UploadInfo, expected: UploadInfo, total: int | None) -> int | None:
    """A store's precondition for appending at ``expected.offset``: the upload
    is still the one the caller read, unfinished, and at that offset. Returns
    the total to hold after the write."""
    if stored.completed is not None:
        raise UploadNotFound(f"the upload {expected.name!r} is already complete")
    check_same_session(stored, expected)
    if stored.offset != expected.offset:
        raise OffsetMismatch(
            f"{expected.name!r} holds {stored.offset} bytes, not {expected.offset}",
            offset=stored.offset,
        )
    return settle_total(stored, total)


def check_finish(stored: UploadInfo, expected: UploadInfo) -> bool:
    """A store's precondition for finishing: True if the session is already
    complete (return it as it is), False if it may be finished now."""
    check_same_session(stored, expected)
    if stored.completed is not None:
        return True
    if stored.total is None:
        raise BadRequest(
            f"the total size of {stored.name!r} is not known yet; it cannot be finished"
        )
    if stored.offset != stored.total:
        raise BadRequest(
            f"{stored.name!r} holds {stored.offset} of {stored.total} bytes; "
            "it cannot be finished yet"
        )
    return False


def check_cancel(stored: UploadInfo, session_id: str | None) -> None:
    """A cancel limited to ``session_id`` leaves a replacement alone."""
    if session_id is not None and stored.session_id != session_id:
        raise UploadNotFound(f"the upload {stored.name!r} was replaced by a newer one")
