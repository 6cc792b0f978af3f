"""The memory budget on its own: grants in order, waits, timeouts, and the
``leave`` rule that keeps held bodies from starving the parts they need."""

from __future__ import annotations

import asyncio

import pytest

from app.core.budget import MemoryBudget
from app.errors import Overloaded

LONG = 60.0


async def started(budget: MemoryBudget, size: int, **kw: int) -> asyncio.Task[None]:
    """A task waiting in ``acquire``; returns once it is queued."""
    before = budget.waiting
    task = asyncio.create_task(budget.acquire(size, **kw))
    while budget.waiting == before and not task.done():
        await asyncio.sleep(0)
    return task


async def test_grants_at_once_while_it_fits_and_tracks_the_peak() -> None:
    budget = MemoryBudget(10, wait=LONG)
    await budget.acquire(4)
    await budget.acquire(6)
    assert (budget.held, budget.peak, budget.waiting) == (10, 10, 0)
    budget.release(6)
    assert (budget.held, budget.peak) == (4, 10)
    budget.reset_peak()
    assert budget.peak == 4


async def test_a_request_that_does_not_fit_waits_until_memory_is_released() -> None:
    budget = MemoryBudget(10, wait=LONG)
    await budget.acquire(8)
    waiter = await started(budget, 5)
    assert not waiter.done() and budget.waiting == 1
    budget.release(2)  # 6 held: 5 more still does not fit
    await asyncio.sleep(0)
    assert not waiter.done()
    budget.release(6)
    await waiter
    assert (budget.held, budget.waiting) == (5, 0)


async def test_plain_requests_are_served_first_come_first_served() -> None:
    budget = MemoryBudget(10, wait=LONG)
    await budget.acquire(10)
    big = await started(budget, 8)
    small = await started(budget, 2)
    budget.release(3)  # the small one would fit, but the big one came first
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    budget.release(7)
    await asyncio.gather(big, small)
    assert budget.held == 10


async def test_a_wait_past_the_limit_is_overloaded_and_leaves_nothing_held() -> None:
    # The wait is what is tested here: a short one.
    budget = MemoryBudget(10, wait=0.05)
    await budget.acquire(10)
    with pytest.raises(Overloaded) as caught:
        await budget.acquire(1)
    assert caught.value.status == 503
    assert caught.value.headers()["Retry-After"]
    assert (budget.held, budget.waiting, budget.timeouts) == (10, 0, 1)


async def test_a_cancelled_waiter_is_forgotten_and_unblocks_the_ones_behind() -> None:
    budget = MemoryBudget(10, wait=LONG)
    await budget.acquire(6)
    big = await started(budget, 8)
    small = await started(budget, 4)
    big.cancel()
    await small  # no longer behind a request that left
    with pytest.raises(asyncio.CancelledError):
        await big
    assert (budget.held, budget.waiting) == (10, 0)


async def test_leave_keeps_room_and_never_holds_up_plain_requests() -> None:
    budget = MemoryBudget(10, wait=LONG)
    await budget.acquire(3)
    # 3 + 5 + a part of 4 left free would be 12: the held body must wait...
    body = await started(budget, 5, leave=4)
    assert not body.done()
    # ... while a part queued behind it is granted.
    await budget.acquire(4)
    assert budget.held == 7
    budget.release(7)
    await body
    assert budget.held == 5
    assert budget.free >= 4


async def test_a_request_bigger_than_the_budget_gets_it_alone() -> None:
    budget = MemoryBudget(10, wait=LONG)
    await budget.acquire(1)
    huge = await started(budget, 25)
    assert not huge.done()
    budget.release(1)
    await huge
    assert budget.held == 25


async def test_a_reservation_gives_back_early_and_the_rest_at_its_end() -> None:
    budget = MemoryBudget(10, wait=LONG)
    async with budget.reserved(6) as reservation:
        reservation.give_back(4)
        assert budget.held == 2
        reservation.give_back(10)  # never more than it holds
        assert budget.held == 0
    assert budget.held == 0
    with pytest.raises(RuntimeError):
        async with budget.reserved(6):
            raise RuntimeError("the block failed")
    assert budget.held == 0


async def test_a_stopped_request_ends_its_wait_now_and_waits_for_nothing_more() -> None:
    budget = MemoryBudget(10, wait=LONG)
    await budget.acquire(10)
    stops = []

    async def request() -> None:
        async with budget.stoppable(stops.append):
            with pytest.raises(Overloaded, match="asked to stop"):
                await budget.acquire(5)
            # Asked to stop: a later wait ends at once too.
            with pytest.raises(Overloaded):
                await budget.acquire(1)
        # Past the block (the connection's next request) nothing is stopped.
        budget.release(10)
        await budget.acquire(1)

    task = asyncio.create_task(request())
    while not budget.waiting:
        await asyncio.sleep(0)
    stops[0]()
    await task
    assert (budget.held, budget.waiting, budget.timeouts) == (1, 0, 0)
    stops[0]()  # a stop that comes late changes nothing
    await budget.acquire(1)
    assert budget.held == 2
