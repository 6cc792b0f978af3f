"""The memory budget: bytes of upload data one app may hold in memory at once,
shared by every request.

A request that needs memory the budget does not have waits for it instead of
allocating. While it waits it reads nothing more from its client, so the
client is held back by TCP itself. A wait longer than the budget's ``wait``
ends in ``Overloaded`` (503 with ``Retry-After``).

Two kinds of holders keep waits from turning into a deadlock:

* buffers that are freed by progress that needs no more memory (a full part
  being uploaded) ask plainly, and are granted in arrival order;
* memory held *while* its holder goes on to ask for more (a body held until
  its checksum is verified, then written through part buffers) asks with
  ``leave``: it is granted only if that much stays free afterwards, and it
  never holds up plain requests queued behind it. With ``leave`` at least one
  part, the bodies held that way can never take the room the parts they are
  waiting for need.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from app.errors import Overloaded


@dataclass
class _Waiter:
    size: int
    leave: int
    task: asyncio.Task[Any] | None
    granted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class MemoryBudget:
    """``limit`` bytes for the whole app; requests wait at most ``wait`` seconds."""

    def __init__(self, limit: int, *, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self.held = 0
        self.peak = 0
        #: Waits that ran out of time (``Overloaded``), since the budget was made.
        self.timeouts = 0
        self._waiters: list[_Waiter] = []
        #: Tasks whose requests were asked to stop: they wait for nothing more.
        self._stopping: set[asyncio.Task[Any]] = set()

    @property
    def waiting(self) -> int:
        """Requests waiting for memory right now."""
        return len(self._waiters)

    @property
    def free(self) -> int:
        return max(0, self.limit - self.held)

    def reset_peak(self) -> None:
        self.peak = self.held

    async def acquire(self, size: int, *, leave: int = 0) -> None:
        """Take ``size`` bytes, waiting for them up to ``wait`` seconds;
        ``Overloaded`` if they did not come in time. With ``leave``, only
        while ``leave`` bytes stay free after the grant (see the module)."""
        if size <= 0:
            return
        task = asyncio.current_task()
        waiter = _Waiter(size, leave, task)
        self._waiters.append(waiter)
        self._grant()
        if waiter.granted.done():
            return
        if task in self._stopping:
            # Asked to stop: memory that is free is still taken (what it lets
            # the request keep is worth it), but it waits for none.
            self._forget(waiter)
            raise self._stopped()
        try:
            async with asyncio.timeout(self.wait):
                await asyncio.shield(waiter.granted)
        except TimeoutError:
            if waiter.granted.done():
                if waiter.granted.exception() is not None:
                    raise waiter.granted.exception() from None
            else:
                self._forget(waiter)
                self.timeouts += 1
                raise Overloaded(
                    f"the service had no memory for this request for {self.wait:g}s "
                    "(storage.memory_budget is in use by other uploads); what arrived "
                    "was kept: probe the offset and resume"
                ) from None
        except Overloaded:
            raise  # stopped: the waiter is gone already
        except BaseException:
            # Cancelled while waiting, or right after the grant: nothing is kept.
            if waiter.granted.done() and waiter.granted.exception() is None:
                self.release(size)
            else:
                self._forget(waiter)
            raise

    @asynccontextmanager
    async def stoppable(self, on_stop: Callable[[Callable[[], None]], None]
                        ) -> AsyncIterator[None]:
        """For the block, the current task's waits can be stopped: ``on_stop``
        is given a function that ends them, the one under way and any later
        one (memory free at once is still granted), with ``Overloaded``. For
        a request asked to stop (a takeover, shutdown) while it waits for
        memory, which it would not notice otherwise: it is reading nothing."""
        task = asyncio.current_task()
        assert task is not None
        active = True

        def stop() -> None:
            if not active:
                return  # the request is past its block: a keep-alive
            self._stopping.add(task)  # connection's next one is not stopped
            for waiter in [w for w in self._waiters if w.task is task]:
                self._waiters.remove(waiter)
                waiter.granted.set_exception(self._stopped())
            self._grant()

        on_stop(stop)
        try:
            yield
        finally:
            active = False
            self._stopping.discard(task)

    @staticmethod
    def _stopped() -> Overloaded:
        return Overloaded("the request was asked to stop while it waited for memory; "
                          "what arrived was kept")

    def hold(self, size: int) -> None:
        """Count ``size`` bytes that are in memory already, without waiting
        (they cannot be refused any more, only accounted for)."""
        if size > 0:
            self._take(size)

    def release(self, size: int) -> None:
        if size <= 0:
            return
        self.held -= size
        assert self.held >= 0, "released more than was held"
        self._grant()

    @asynccontextmanager
    async def reserved(self, size: int, *, leave: int = 0) -> AsyncIterator[Reservation]:
        """``size`` bytes held for the block (acquired as ``acquire`` does);
        the part not given back early through ``Reservation.give_back`` is
        released at its end."""
        await self.acquire(size, leave=leave)
        reservation = Reservation(self, size)
        try:
            yield reservation
        finally:
            reservation.give_back(reservation.remaining)

    def _fits(self, size: int, leave: int) -> bool:
        if leave == 0 and self.held == 0:
            # A buffer bigger than the whole budget (parts of objects past
            # part_size x 10,000) gets it alone rather than never.
            return True
        return self.held + size + leave <= self.limit

    def _take(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        waiter.granted.cancel()
        # A waiter that left may have held up smaller ones behind it.
        self._grant()

    def _grant(self) -> None:
        blocked = False
        for waiter in list(self._waiters):
            if waiter.leave == 0 and blocked:
                continue
            if self._fits(waiter.size, waiter.leave):
                self._waiters.remove(waiter)
                self._take(waiter.size)
                waiter.granted.set_result(None)
            elif waiter.leave == 0:
                # First come, first served among plain requests.
                blocked = True


class Reservation:
    """Bytes taken with ``MemoryBudget.reserved``, given back as they are let go."""

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self._budget = budget
        self.remaining = size

    def give_back(self, size: int) -> None:
        size = min(size, self.remaining)
        self.remaining -= size
        self._budget.release(size)
