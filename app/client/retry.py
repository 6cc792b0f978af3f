"""The retry policy as an immutable value, in the manner of urllib3's ``Retry``:
``increment()`` returns the next policy (or raises when the budget is spent)
and ``delay()`` says how long to wait; the caller does the sleeping, so the
policy is pure and a test can drive it with its own randomness."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from app.client.errors import RetriesExhausted


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter.

    ``retries`` is the number of consecutive failed attempts allowed without
    progress; the uploader starts again from its initial policy whenever the
    server acknowledges new bytes, so a long upload over a link that drops every
    few minutes is not failed by the sum of its interruptions.
    """

    retries: int = 8
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 300.0
    attempt: int = 0
    last_error: str | None = None

    def __post_init__(self) -> None:
        if self.retries < 0 or self.base < 0 or self.cap < 0 or self.max_retry_after < 0:
            raise ValueError("retries, base, cap and max_retry_after must be >= 0")

    @property
    def exhausted(self) -> bool:
        return self.attempt > self.retries

    def increment(self, error: str) -> Backoff:
        """The policy after one more failure; raises ``RetriesExhausted`` when
        that failure was one too many."""
        nxt = replace(self, attempt=self.attempt + 1, last_error=error)
        if nxt.exhausted:
            raise RetriesExhausted(
                f"gave up after {self.retries} retries; last error: {error}", attempts=nxt.attempt
            )
        return nxt

    def reset(self) -> Backoff:
        return replace(self, attempt=0, last_error=None)

    def delay(self, uniform: Callable[[float, float], float] = random.uniform,
              retry_after: float | None = None) -> float:
        """Seconds to wait before the current attempt. A server's ``Retry-After``
        wins over the computed backoff (the server knows when it will be back),
        bounded so a hostile value cannot park the client for a day."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        if self.attempt <= 0:
            return 0.0
        ceiling = min(self.cap, self.base * (2 ** (self.attempt - 1)))
        return uniform(0.0, ceiling)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import datetime as dt

    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
