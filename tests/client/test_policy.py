"""The pure parts: the backoff policy, the saved state, GCS-style session URLs."""

from __future__ import annotations

import pytest

from app.client import Backoff, RetriesExhausted, SessionState, upload
from app.client.core import is_session_url, needs_initiation
from app.client.progress import RateMeter
from app.client.retry import parse_retry_after
from tests.client.support import KIB, data_of, stored


def test_backoff_is_immutable_with_full_jitter() -> None:
    policy = Backoff(retries=3, base=1.0, cap=5.0)
    seen: list[tuple[float, float]] = []

    def top(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return hi

    first = policy.increment("boom")
    assert policy.attempt == 0 and first.attempt == 1 and first.last_error == "boom"
    assert [first.delay(top), first.increment("x").delay(top),
            first.increment("x").increment("x").delay(top)] == [1.0, 2.0, 4.0]
    assert seen == [(0.0, 1.0), (0.0, 2.0), (0.0, 4.0)]
    assert Backoff(base=1.0, cap=5.0, attempt=7).delay(top) == 5.0
    # The server's Retry-After wins, within max_retry_after.
    assert first.delay(top, retry_after=12) == 12
    assert first.delay(top, retry_after=10_000) == policy.max_retry_after
    with pytest.raises(RetriesExhausted):
        first.increment("a").increment("b").increment("c")
    assert first.increment("a").reset() == policy
    with pytest.raises(ValueError):
        Backoff(retries=-1)


def test_retry_after_header() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_state_round_trip_and_validation() -> None:
    state = SessionState(url="http://h/upload/a", offset=5, total=None, chunk_size=262144,
                         crc32c=123)
    assert SessionState.from_json(state.to_json()) == state
    for bad in ({**state.to_dict(), "version": 9}, {**state.to_dict(), "offset": -1},
                {**state.to_dict(), "crc32c": 2**32}, {**state.to_dict(), "total": 1}):
        with pytest.raises(ValueError):
            SessionState.from_dict(bad)


def test_session_url_detection() -> None:
    gcs = "https://storage.googleapis.com/upload/storage/v1/b/bk/o"
    assert needs_initiation(f"{gcs}?uploadType=resumable&name=a.bin")
    assert not needs_initiation(f"{gcs}?uploadType=resumable&upload_id=xyz")
    assert is_session_url(f"{gcs}?uploadType=resumable&upload_id=xyz")
    assert not is_session_url("http://127.0.0.1:8080/upload/videos/a.mp4")


async def test_json_api_style_initiation_then_session_url(proxy, store_harness) -> None:
    """``uploadType=resumable`` without a session: POST first, then PUT to ``Location``."""
    data = data_of(700 * KIB)
    result = await upload(f"{proxy.url}/upload/g/a.bin?uploadType=resumable", data,
                          chunk_size=256 * KIB, content_type="application/x-test")
    assert result["size"] == len(data) and result["contentType"] == "application/x-test"
    assert await stored(store_harness, "g/a.bin") == data


def test_rate_meter_window_and_resend() -> None:
    meter = RateMeter(window=5.0)
    assert meter.add(0.0, 0) == 0.0
    assert meter.add(1.0, 100) == 100.0
    assert meter.add(10.0, 1000) == 100.0
    # Samples older than the window are dropped.
    assert meter.add(11.0, 1100) == 100.0
    # Back to an earlier offset after a failure: measured afresh.
    assert meter.add(12.0, 500) == 0.0
    assert meter.add(13.0, 800) == 300.0
