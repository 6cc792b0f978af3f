"""Pure: the exact-offset append mode (tus, the IETF draft) in the session rules."""

from __future__ import annotations

import pytest

from app.core import rules
from app.core.model import UploadInfo
from app.errors import BadRequest, OffsetMismatch, TotalMismatch

LIMITS = rules.Limits()


def upload(offset: int, total: int | None) -> UploadInfo:
    return UploadInfo(name="n", session_id="s", offset=offset, total=total,
                      part_size=6 * 1024 * 1024, crc32c=0, content_type="x")


@pytest.mark.parametrize(("info", "start", "length", "total", "error"), [
    # A wrong offset is reported first, whatever lengths the request implies.
    (upload(100, 500), 50, 10, 60, OffsetMismatch),
    (upload(100, 500), 150, 400, None, OffsetMismatch),
    (upload(100, None), 0, None, None, OffsetMismatch),
    # At the right offset, a contradicting total or an overlong range is a 400.
    (upload(100, 500), 100, 10, 110, TotalMismatch),
    (upload(100, 500), 100, 401, None, BadRequest),
])
def test_exact_offset_refusals(info, start, length, total, error) -> None:
    request = rules.AppendRequest(start=start, length=length, total=total)
    with pytest.raises(error):
        rules.plan_append(info, request, rules.Mode.EXACT_OFFSET, LIMITS)


@pytest.mark.parametrize(("info", "start", "length", "total", "plan"), [
    (upload(100, 500), 100, 50, None, (0, 50, None)),
    (upload(100, None), 100, None, None, (0, None, None)),
    (upload(100, None), 100, 0, 100, (0, 0, 100)),
])
def test_exact_offset_plans(info, start, length, total, plan) -> None:
    request = rules.AppendRequest(start=start, length=length, total=total)
    got = rules.plan_append(info, request, rules.Mode.EXACT_OFFSET, LIMITS)
    assert (got.skip, got.length, got.settle_total) == plan


def test_skip_overlap_still_skips_what_is_stored() -> None:
    request = rules.AppendRequest(start=50, length=100, total=None)
    got = rules.plan_append(upload(100, 500), request, rules.Mode.SKIP_OVERLAP, LIMITS)
    assert (got.skip, got.length) == (50, 50)
