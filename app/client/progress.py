"""Progress events the uploader emits to its ``on_progress`` callback."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """``acknowledged``: bytes the server confirmed as stored; ``sent``: bytes
    handed to the connection in total, resends included (so ``sent`` may exceed
    the size after interruptions); ``position``: how far into the source the
    current request has got. ``rate`` in bytes/s over the last seconds, ``eta``
    in seconds when the total is known."""

    acknowledged: int
    sent: int
    position: int
    total: int | None
    rate: float
    eta: float | None
    elapsed: float


@dataclass(frozen=True)
class Retrying:
    """A request failed; the client waits ``delay`` seconds, probes and continues."""

    attempt: int
    delay: float
    error: str
    acknowledged: int


@dataclass(frozen=True)
class Resumed:
    """After a probe: the server holds ``offset`` bytes and the client continues there."""

    offset: int


@dataclass(frozen=True)
class Completed:
    result: dict[str, Any]
    size: int
    sent: int
    elapsed: float


Event = Progress | Retrying | Resumed | Completed
ProgressCallback = Callable[[Event], Any]


class RateMeter:
    """Bytes per second over a sliding window of ``window`` seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, position: int) -> float:
        if self._samples and position < self._samples[-1][1]:
            # Resent from the acknowledged offset after a failure: the bytes
            # lost in between must not count as negative throughput.
            self._samples.clear()
        self._samples.append((now, position))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        first_t, first_pos = self._samples[0]
        span = now - first_t
        return (position - first_pos) / span if span > 0 else 0.0
