"""MD5 followed through the requests of a chunked session, within one process.

hashlib cannot export an MD5 state, so no store can persist it; what can be
kept is the live hash object between one request and the next. Each session
has at most one running MD5 here, valid for exactly the offset it was left
at. A request whose write starts at that offset continues it (the engine
feeds it exactly the bytes it hands the store); anything else, a write that
started elsewhere, bytes that were hashed but not stored, a session another
process advanced, drops it, and that session then completes without
``md5Hash`` rather than with a wrong one.

Cost: MD5 ran at 690 MiB/s on one core here (1.5 CPU-s/GiB), on top of the
CRC32C every upload pays; ``gcs.md5: false`` turns it off.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from app.engine.model import Outcome

#: Sessions followed at once; the least recently used beyond it are forgotten
#: (they complete without md5Hash), so memory stays bounded (~200 B each).
DEFAULT_CAPACITY = 10_000


@dataclass
class CountingMd5:
    """A running MD5 that knows how many bytes it has seen."""

    start: int
    hasher: hashlib._Hash = field(default_factory=hashlib.md5)
    seen: int = 0

    def update(self, data: bytes, /) -> None:
        self.hasher.update(data)
        self.seen += len(data)

    def digest(self) -> bytes:
        return self.hasher.digest()


@dataclass(frozen=True)
class _Saved:
    offset: int
    hasher: hashlib._Hash


class Md5Follower:
    """The running MD5s of this process's chunked sessions (one per app)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._saved: OrderedDict[str, _Saved] = OrderedDict()

    def request(self, session: str) -> FollowedRequest:
        return FollowedRequest(self, session)

    def _take(self, session: str, offset: int) -> CountingMd5 | None:
        saved = self._saved.pop(session, None)
        if offset == 0:
            return CountingMd5(start=0)
        if saved is None or saved.offset != offset:
            return None
        return CountingMd5(start=offset, hasher=saved.hasher)

    def _keep(self, session: str, offset: int, hasher: hashlib._Hash) -> None:
        self._saved[session] = _Saved(offset, hasher)
        self._saved.move_to_end(session)
        while len(self._saved) > self._capacity:
            self._saved.popitem(last=False)

    def forget(self, session: str) -> None:
        self._saved.pop(session, None)

    def __len__(self) -> int:
        return len(self._saved)


class FollowedRequest:
    """One request's part: hands the engine the MD5 for the offset its write
    starts at, then keeps the result only if it covers what was stored."""

    def __init__(self, follower: Md5Follower, session: str) -> None:
        self._follower = follower
        self._session = session
        self._running: CountingMd5 | None = None

    def source(self, offset: int) -> CountingMd5 | None:
        """The engine's ``md5_source``."""
        self._running = self._follower._take(self._session, offset)
        return self._running

    def settle(self, outcome: Outcome | None) -> None:
        """After the engine answered (None: it raised)."""
        running, self._running = self._running, None
        if outcome is None:
            if running is not None:
                self._follower.forget(self._session)
            return
        if running is None:
            return
        info = outcome.info
        exact = running.start == info.offset - outcome.stored and running.seen == outcome.stored
        if info.is_complete or not exact:
            self._follower.forget(self._session)
        else:
            self._follower._keep(self._session, info.offset, running.hasher)
