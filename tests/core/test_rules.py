"""The session rules, table-driven: no store, no engine, no sockets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.core import rules
from app.core.model import CompletedObject, UploadInfo
from app.core.protocol import MAX_OBJECT_SIZE, MAX_PARTS
from app.errors import (
    BadRequest,
    Forbidden,
    LengthMismatch,
    OffsetMismatch,
    TooLarge,
    TotalMismatch,
    UploadError,
    UploadNotFound,
)

MIB = 1024 * 1024
PART = 6 * MIB
SKIP = rules.Mode.SKIP_OVERLAP
EXACT = rules.Mode.EXACT_OFFSET
NO_LIMITS = rules.Limits()


def upload(offset: int = 0, total: int | None = None, **changes: object) -> UploadInfo:
    info = UploadInfo(
        name="a.bin",
        session_id="s1",
        offset=offset,
        total=total,
        part_size=PART,
        crc32c=0,
        content_type="application/octet-stream",
        created_at=100.0,
        updated_at=100.0,
    )
    return replace(info, **changes)


def completed(size: int) -> UploadInfo:
    done = CompletedObject(
        key="a.bin", bucket="b", size=size, etag='"e"', crc32c=0, completed_at=200.0
    )
    return upload(size, size, completed=done)


def request(start: int, length: int | None, total: int | None = None) -> rules.AppendRequest:
    return rules.AppendRequest(start=start, length=length, total=total)


# -- plan_append ----------------------------------------------------------------

PLANS = [
    # (stored offset, stored total, request, mode, limits) -> (skip, length, settle, limit)
    pytest.param(0, 100, request(0, 100), SKIP, NO_LIMITS, (0, 100, None, 100), id="first"),
    pytest.param(10, 100, request(10, 5), SKIP, NO_LIMITS, (0, 5, None, 100), id="next"),
    pytest.param(10, 100, request(0, 20), SKIP, NO_LIMITS, (10, 10, None, 100), id="overlap"),
    pytest.param(10, 100, request(0, 5), SKIP, NO_LIMITS, (5, 0, None, 100), id="all-old"),
    pytest.param(10, 100, request(4, None), SKIP, NO_LIMITS, (6, None, None, 100),
                 id="streaming-overlap"),
    pytest.param(10, None, request(10, 5, 50), SKIP, NO_LIMITS, (0, 5, 50, 50), id="settles"),
    pytest.param(10, 50, request(10, 5, 50), SKIP, NO_LIMITS, (0, 5, None, 50),
                 id="restated-total"),
    pytest.param(0, None, request(0, None), SKIP, NO_LIMITS, (0, None, None, PART * MAX_PARTS),
                 id="unknown-total-limit"),
    pytest.param(0, None, request(0, 10), SKIP, rules.Limits(configured=500, granted=300),
                 (0, 10, None, 300), id="granted-lowest"),
    pytest.param(0, 1000, request(0, 10), SKIP, rules.Limits(configured=500),
                 (0, 10, None, 500), id="configured-lowest"),
    pytest.param(10, 100, request(10, 5), EXACT, NO_LIMITS, (0, 5, None, 100), id="exact"),
    pytest.param(10, None, request(10, None, 40), EXACT, NO_LIMITS, (0, None, 40, 40),
                 id="exact-settles"),
]


@pytest.mark.parametrize(("offset", "total", "req", "mode", "limits", "expected"), PLANS)
def test_plan_append(
    offset: int,
    total: int | None,
    req: rules.AppendRequest,
    mode: rules.Mode,
    limits: rules.Limits,
    expected: tuple[int, int | None, int | None, int],
) -> None:
    plan = rules.plan_append(upload(offset, total), req, mode, limits)
    assert (plan.skip, plan.length, plan.settle_total, plan.limit) == expected


REFUSED_PLANS = [
    # (stored offset, stored total, request, mode, limits) -> error, offset it reports
    pytest.param(10, 100, request(12, 5), SKIP, NO_LIMITS, OffsetMismatch, 10, id="gap"),
    pytest.param(10, 100, request(5, 10), EXACT, NO_LIMITS, OffsetMismatch, 10,
                 id="exact-before"),
    pytest.param(10, 100, request(11, 10), EXACT, NO_LIMITS, OffsetMismatch, 10,
                 id="exact-after"),
    pytest.param(0, 100, request(0, 10, 99), SKIP, NO_LIMITS, TotalMismatch, 0,
                 id="contradicting-total"),
    pytest.param(50, None, request(0, 10, 40), SKIP, NO_LIMITS, TotalMismatch, 50,
                 id="total-below-stored"),
    pytest.param(90, 100, request(90, 20), SKIP, NO_LIMITS, BadRequest, None,
                 id="past-the-total"),
    pytest.param(0, None, request(0, 20), SKIP, rules.Limits(granted=10), TooLarge, None,
                 id="past-the-grant"),
    pytest.param(5, None, request(5, 10), SKIP, rules.Limits(configured=10), TooLarge, None,
                 id="past-the-configured-size"),
    pytest.param(0, None, request(0, 10, PART * MAX_PARTS + 1), SKIP, NO_LIMITS, TooLarge, None,
                 id="settled-total-beyond-the-part-size"),
]


@pytest.mark.parametrize(
    ("offset", "total", "req", "mode", "limits", "error", "reported"), REFUSED_PLANS
)
def test_plan_append_refuses(
    offset: int,
    total: int | None,
    req: rules.AppendRequest,
    mode: rules.Mode,
    limits: rules.Limits,
    error: type[UploadError],
    reported: int | None,
) -> None:
    with pytest.raises(error) as caught:
        rules.plan_append(upload(offset, total), req, mode, limits)
    if reported is not None:
        # The offset lets the HTTP layer answer with the true Range.
        exc = caught.value
        assert getattr(exc, "offset", exc.details.get("offset")) == reported


def test_exact_offset_mismatch_names_the_offset_to_resend_from() -> None:
    with pytest.raises(OffsetMismatch) as caught:
        rules.plan_append(upload(10, 100), request(0, 20), EXACT, NO_LIMITS)
    assert caught.value.offset == 10
    assert "resend from byte 10" in caught.value.message


# -- the stores' preconditions -----------------------------------------------------

WRITES = [
    # (stored, expected, total) -> total to hold, or the error
    pytest.param(upload(10), upload(10), None, None, id="unknown-stays-unknown"),
    pytest.param(upload(10, 100), upload(10, 100), None, 100, id="known-stays"),
    pytest.param(upload(10), upload(10), 100, 100, id="settles"),
    pytest.param(upload(10, 100), upload(10, 100), 100, 100, id="restated"),
    pytest.param(upload(10), upload(10), 10, 10, id="settles-at-the-offset"),
    pytest.param(upload(10, 100), upload(10, 100), 99, TotalMismatch, id="contradicts"),
    pytest.param(upload(10), upload(10), 9, TotalMismatch, id="below-the-offset"),
    pytest.param(upload(10), upload(10), PART * MAX_PARTS + 1, TooLarge, id="beyond-parts"),
    pytest.param(upload(12), upload(10), None, OffsetMismatch, id="moved-on"),
    pytest.param(upload(10, session_id="s2"), upload(10), None, OffsetMismatch, id="replaced"),
    pytest.param(completed(10), upload(10, 10), None, UploadNotFound, id="completed"),
]


@pytest.mark.parametrize(("stored", "expected", "total", "outcome"), WRITES)
def test_check_write(
    stored: UploadInfo, expected: UploadInfo, total: int | None, outcome: object
) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            rules.check_write(stored, expected, total)
    else:
        assert rules.check_write(stored, expected, total) == outcome


def test_check_write_reports_the_stored_offset() -> None:
    with pytest.raises(OffsetMismatch) as caught:
        rules.check_write(upload(12), upload(10), None)
    assert caught.value.offset == 12


FINISHES = [
    # (stored, expected) -> already complete?, or the error
    pytest.param(upload(10, 10), upload(10, 10), False, id="ready"),
    pytest.param(upload(0, 0), upload(0, 0), False, id="empty"),
    pytest.param(completed(10), upload(10, 10), True, id="already-complete"),
    pytest.param(upload(10), upload(10), BadRequest, id="total-unknown"),
    pytest.param(upload(5, 10), upload(5, 10), BadRequest, id="bytes-missing"),
    pytest.param(upload(10, 10, session_id="s2"), upload(10, 10), OffsetMismatch, id="replaced"),
    pytest.param(completed(10), upload(10, 10, session_id="s0"), OffsetMismatch,
                 id="replaced-and-completed"),
]


@pytest.mark.parametrize(("stored", "expected", "outcome"), FINISHES)
def test_check_finish(stored: UploadInfo, expected: UploadInfo, outcome: object) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            rules.check_finish(stored, expected)
    else:
        assert rules.check_finish(stored, expected) is outcome


SETTLES = [
    # (stored offset, stored total, stated total) -> total after the write, or the error
    pytest.param(10, None, None, None, id="nothing-stated"),
    pytest.param(10, 50, None, 50, id="nothing-stated-known"),
    pytest.param(10, None, 50, 50, id="settled"),
    pytest.param(10, None, 10, 10, id="settled-at-offset"),
    pytest.param(10, 50, 50, 50, id="same"),
    pytest.param(10, 50, 60, TotalMismatch, id="contradicts"),
    pytest.param(10, None, 9, TotalMismatch, id="below-offset"),
    pytest.param(0, None, PART * MAX_PARTS, PART * MAX_PARTS, id="largest-that-fits"),
    pytest.param(0, None, PART * MAX_PARTS + 1, TooLarge, id="does-not-fit"),
]


@pytest.mark.parametrize(("offset", "total", "stated", "outcome"), SETTLES)
def test_settle_total(offset: int, total: int | None, stated: int | None, outcome: object) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            rules.settle_total(upload(offset, total), stated)
    else:
        assert rules.settle_total(upload(offset, total), stated) == outcome


STATED = [
    # (upload, stated total) -> None if accepted, else the error
    pytest.param(upload(10), None, None, id="nothing-stated"),
    pytest.param(upload(10), 10, None, id="unknown-equal-to-offset"),
    pytest.param(upload(10), 100, None, id="unknown-above-offset"),
    pytest.param(upload(10), 9, TotalMismatch, id="below-offset"),
    pytest.param(upload(10, 100), 100, None, id="same"),
    pytest.param(upload(10, 100), 101, TotalMismatch, id="contradicts"),
    pytest.param(completed(10), 10, None, id="completed-same-size"),
    pytest.param(completed(10), 11, TotalMismatch, id="completed-other-size"),
]


@pytest.mark.parametrize(("info", "stated", "error"), STATED)
def test_check_stated_total(
    info: UploadInfo, stated: int | None, error: type[UploadError] | None
) -> None:
    if error is None:
        rules.check_stated_total(info, stated)
    else:
        with pytest.raises(error):
            rules.check_stated_total(info, stated)


LIMITS = [
    # (part size, total, limits) -> the most bytes the upload may hold
    pytest.param(PART, None, NO_LIMITS, PART * MAX_PARTS, id="parts-bound"),
    pytest.param(PART, 1000, NO_LIMITS, 1000, id="total"),
    pytest.param(PART, 1000, rules.Limits(granted=10), 10, id="grant"),
    pytest.param(PART, 1000, rules.Limits(configured=20, granted=30), 20, id="configured"),
    pytest.param(PART, None, rules.Limits(granted=5 * PART * MAX_PARTS), PART * MAX_PARTS,
                 id="grant-above-parts"),
    pytest.param(1024 * MIB, None, NO_LIMITS, MAX_OBJECT_SIZE, id="object-bound"),
]


@pytest.mark.parametrize(("part_size", "total", "limits", "expected"), LIMITS)
def test_upload_limit(
    part_size: int, total: int | None, limits: rules.Limits, expected: int
) -> None:
    assert rules.upload_limit(upload(part_size=part_size), total, limits) == expected


DECLARED = [
    # (declared size, limits) -> None if accepted, else the error
    pytest.param(None, rules.Limits(configured=1, granted=1), None, id="unknown"),
    pytest.param(0, NO_LIMITS, None, id="empty"),
    pytest.param(-1, NO_LIMITS, TotalMismatch, id="negative"),
    pytest.param(100, rules.Limits(granted=100), None, id="at-the-grant"),
    pytest.param(101, rules.Limits(granted=100), TooLarge, id="past-the-grant"),
    pytest.param(100, rules.Limits(configured=100), None, id="at-the-configured"),
    pytest.param(101, rules.Limits(configured=100), TooLarge, id="past-the-configured"),
    pytest.param(MAX_OBJECT_SIZE, NO_LIMITS, None, id="largest-object"),
    pytest.param(MAX_OBJECT_SIZE + 1, NO_LIMITS, TooLarge, id="past-the-largest-object"),
]


@pytest.mark.parametrize(("size", "limits", "error"), DECLARED)
def test_check_declared_size(
    size: int | None, limits: rules.Limits, error: type[UploadError] | None
) -> None:
    if error is None:
        rules.check_declared_size(size, limits)
    else:
        with pytest.raises(error):
            rules.check_declared_size(size, limits)


# -- the rest of the module ----------------------------------------------------------

LIVE = [
    # (upload, now, request owner) -> None if usable, else the error
    pytest.param(upload(), 100.0 + 60, None, None, id="fresh"),
    pytest.param(upload(), 100.0 + 60 + 1, None, UploadNotFound, id="expired"),
    pytest.param(completed(1), 1e12, None, None, id="completed-never-expires"),
    pytest.param(upload(owner="alice"), 100.0, "alice", None, id="same-owner"),
    pytest.param(upload(owner="alice"), 100.0, "bob", Forbidden, id="other-owner"),
    pytest.param(upload(owner="alice"), 100.0, None, None, id="request-binds-nobody"),
    pytest.param(upload(), 100.0, "bob", None, id="upload-binds-nobody"),
]


@pytest.mark.parametrize(("info", "now", "owner", "error"), LIVE)
def test_check_live(
    info: UploadInfo, now: float, owner: str | None, error: type[UploadError] | None
) -> None:
    if error is None:
        rules.check_live(info, ttl=60, now=now, owner=owner)
    else:
        with pytest.raises(error):
            rules.check_live(info, ttl=60, now=now, owner=owner)


@pytest.mark.parametrize(
    ("declared", "ranged", "ok"), [(None, 5, True), (5, 5, True), (4, 5, False), (6, 5, False)]
)
def test_check_length(declared: int | None, ranged: int, ok: bool) -> None:
    if ok:
        rules.check_length(declared, ranged)
    else:
        with pytest.raises(LengthMismatch):
            rules.check_length(declared, ranged)


@pytest.mark.parametrize(
    ("info", "ready"),
    [(upload(10, 10), True), (upload(0, 0), True), (upload(9, 10), False), (upload(10), False),
     (completed(10), False)],
)
def test_ready_to_finish(info: UploadInfo, ready: bool) -> None:
    assert rules.ready_to_finish(info) is ready


@pytest.mark.parametrize(
    ("session_id", "error"), [(None, None), ("s1", None), ("s2", UploadNotFound)]
)
def test_check_cancel(session_id: str | None, error: type[UploadError] | None) -> None:
    if error is None:
        rules.check_cancel(upload(), session_id)
    else:
        with pytest.raises(error):
            rules.check_cancel(upload(), session_id)


@pytest.mark.parametrize(
    ("total", "expected"),
    [(None, PART), (0, PART), (PART * MAX_PARTS, PART), (PART * MAX_PARTS + 1, 7 * MIB),
     (-1, TotalMismatch), (MAX_OBJECT_SIZE + 1, TooLarge)],
)
def test_part_size_for_new(total: int | None, expected: object) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            rules.part_size_for_new(total, PART)
    else:
        assert rules.part_size_for_new(total, PART) == expected


# -- aligned_part_size ------------------------------------------------------------

GIB = 1024 * MIB
KIB = 1024
GRANULE = rules.PART_GRANULE
LARGEST = 64 * MIB

ALIGNED = [
    # (offset, length, total, ceiling) -> the part size settled from PART
    pytest.param(0, 8 * MIB, None, None, 8 * MIB, id="8MiB-chunks-unknown-total"),
    pytest.param(0, 8 * MIB, 100 * MIB, None, 8 * MIB, id="8MiB-chunks-known-total"),
    pytest.param(0, 5 * MIB, 40 * GIB, None, 5 * MIB, id="5MiB-smaller-than-configured"),
    pytest.param(0, LARGEST, None, None, LARGEST, id="at-the-cap"),
    pytest.param(0, 128 * MIB, None, None, LARGEST, id="over-the-cap-halved"),
    pytest.param(0, 96 * MIB, None, None, 48 * MIB, id="over-the-cap-halved-again"),
    pytest.param(0, 75 * MIB, None, None, 75 * MIB // 2, id="over-the-cap-half-mebibytes"),
    pytest.param(8 * MIB, 8 * MIB, None, None, PART, id="not-the-first-write"),
    pytest.param(0, None, None, None, PART, id="streamed-no-length"),
    pytest.param(0, 0, None, None, PART, id="empty"),
    pytest.param(0, 8 * MIB, 8 * MIB, None, PART, id="whole-object-plain-put"),
    pytest.param(0, 8 * MIB, 5 * MIB, None, PART, id="longer-than-the-total"),
    pytest.param(0, 4 * MIB, None, None, PART, id="under-5MiB"),
    pytest.param(0, 8 * MIB + 1, None, None, PART, id="not-whole-granules"),
    pytest.param(0, 5 * MIB + 128 * KIB, GIB, None, PART, id="half-granule"),
    pytest.param(0, 5 * MIB + 256 * KIB, GIB, None, 5 * MIB + 256 * KIB, id="one-more-granule"),
    pytest.param(0, 8 * MIB, 8 * MIB * MAX_PARTS, None, 8 * MIB, id="total-fills-10000-parts"),
    pytest.param(0, 8 * MIB, 8 * MIB * MAX_PARTS + 1, None, PART, id="total-needs-10001"),
    # Unknown total: settling smaller than the configured part must not lower
    # the room the upload has, which is the configured maximum if there is one.
    pytest.param(0, 5 * MIB, None, None, PART, id="smaller-unknown-total-no-ceiling"),
    pytest.param(0, 5 * MIB, None, 5 * MIB * MAX_PARTS, 5 * MIB, id="smaller-ceiling-fits"),
    pytest.param(0, 5 * MIB, None, 5 * MIB * MAX_PARTS + 1, PART, id="smaller-ceiling-too-big"),
    pytest.param(0, 8 * MIB, None, 80 * GIB, PART, id="ceiling-over-10000-chunks"),
    # 335 granules (83.75 MiB): halves and quarters are not whole granules,
    # fifths (67 granules) are.
    pytest.param(0, 335 * GRANULE, None, None, 67 * GRANULE, id="first-whole-granule-divisor"),
    # 257 granules (64.25 MiB, just over the cap): no whole-granule divisor.
    pytest.param(0, 257 * GRANULE, None, None, PART, id="over-the-cap-prime-granules"),
]


@pytest.mark.parametrize(("offset", "length", "total", "ceiling", "expected"), ALIGNED)
def test_aligned_part_size(
    offset: int, length: int | None, total: int | None, ceiling: int | None, expected: int
) -> None:
    got = rules.aligned_part_size(PART, offset=offset, length=length, total=total,
                                  ceiling=ceiling, largest=LARGEST)
    assert got == expected


def test_aligned_part_size_keeps_a_part_size_grown_for_a_large_total() -> None:
    # 100 GiB picked 11 MiB parts at creation; 8 MiB chunks would need 12,800.
    grown = rules.part_size_for_new(100 * GIB, PART)
    assert grown == 11 * MIB
    assert rules.aligned_part_size(grown, offset=0, length=8 * MIB, total=100 * GIB,
                                   ceiling=None, largest=LARGEST) == grown
    assert rules.aligned_part_size(grown, offset=0, length=16 * MIB, total=100 * GIB,
                                   ceiling=None, largest=LARGEST) == 16 * MIB
