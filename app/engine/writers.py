"""One writer per upload within a process, with takeover of stale writers.

A phone that loses its network often leaves a half-open connection behind: the
old request sits waiting for body bytes that will never come while the client
has already reconnected. So a new request for an upload does not queue behind
the old one: it asks the current holder to stop, waits (bounded) for it to
persist what it holds and let go, then proceeds.

Across processes the stores' optimistic concurrency (``OffsetMismatch``)
keeps two writers from both advancing one upload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from app.errors import WriterBusy

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """Held by the request currently working on an upload."""

    name: str
    #: The owner the holding request was authorized as (None: unbound).
    owner: str | None = None
    stop_requested: bool = False
    _on_stop: list[Callable[[], None]] = field(default_factory=list)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when another request or shutdown asks this holder to stop."""
        if self.stop_requested:
            callback()
        else:
            self._on_stop.append(callback)

    def request_stop(self) -> None:
        if self.stop_requested:
            return
        self.stop_requested = True
        callbacks, self._on_stop = self._on_stop, []
        for callback in callbacks:
            callback()


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holder: Lease | None = None
    users: int = 0


class WriterRegistry:
    def __init__(self, takeover_timeout: float) -> None:
        self._takeover_timeout = takeover_timeout
        self._slots: dict[str, _Slot] = {}
        self.takeovers = 0

    @property
    def active(self) -> int:
        return sum(1 for slot in self._slots.values() if slot.holder is not None)

    def holder(self, name: str) -> Lease | None:
        """The lease of the request working on ``name`` right now, if any."""
        slot = self._slots.get(name)
        return None if slot is None else slot.holder

    def is_held(self, name: str) -> bool:
        return self.holder(name) is not None

    @asynccontextmanager
    async def hold(self, name: str, owner: str | None = None) -> AsyncIterator[Lease]:
        """Become the only request working on ``name``, taking over from a
        current holder. Raises ``WriterBusy`` if it does not let go in time."""
        slot = self._slots.setdefault(name, _Slot())
        slot.users += 1
        try:
            if slot.holder is not None:
                self.takeovers += 1
                log.info("upload %r: new request takes over from the running one", name)
                slot.holder.request_stop()
            try:
                async with asyncio.timeout(self._takeover_timeout):
                    await slot.lock.acquire()
            except TimeoutError:
                raise WriterBusy(
                    "another request for this upload is still saving its data; retry shortly"
                ) from None
            lease = Lease(name, owner)
            slot.holder = lease
            try:
                yield lease
            finally:
                slot.holder = None
                slot.lock.release()
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[name]

    def stop_all(self) -> None:
        """Ask every holder to stop and persist (graceful shutdown)."""
        for slot in self._slots.values():
            if slot.holder is not None:
                slot.holder.request_stop()
