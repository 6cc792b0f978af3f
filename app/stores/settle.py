"""Waiting for a step to its end even when the waiter is cancelled.

Both stores need it: a thread that writes a file, or an S3 PUT already sent,
goes on whether or not its answer is awaited, and the next request for the
same upload (or the clean-up after a cancellation) must know where it ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")


async def settled(step: Awaitable[_T]) -> _T:
    """Await ``step`` to its end even if cancelled meanwhile, then re-raise the
    cancellation."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        except BaseException:
            if cancelled:
                raise asyncio.CancelledError from None
            raise
        break
    if cancelled:
        raise asyncio.CancelledError
    return result
