"""Liveness and readiness: the storage check behind ``/readyz``.

``GET /healthz`` says the process is up and its event loop answers; it does no
I/O, so a slow or broken storage backend never gets a healthy process killed.

``GET /readyz`` says whether this instance can take uploads: the store's
``HealthCheck`` (write and delete a probe) must pass. The result is cached for
``ttl`` seconds and concurrent probes share one check in flight, so a load
balancer probing every second, from many nodes, does not turn into a steady
stream of storage writes. A check that hangs counts as a failure after
``timeout`` seconds rather than leaving the probe hanging too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from app.errors import UploadError
from app.stores.base import HealthCheck

log = logging.getLogger(__name__)

#: A storage check slower than this is reported as a failure.
DEFAULT_READINESS_TIMEOUT = 5.0


class Readiness:
    def __init__(
        self,
        current_store: Callable[[], object | None],
        *,
        ttl: float,
        timeout: float = DEFAULT_READINESS_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._current_store = current_store
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._checked_at: float | None = None
        self._reason: str | None = None
        self._running: asyncio.Task[str | None] | None = None
        #: Set on shutdown: a draining instance must stop receiving new uploads.
        self.shutting_down = False

    async def check(self) -> str | None:
        """None when ready; otherwise why not, in words for an operator."""
        if self.shutting_down:
            return "the server is shutting down"
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self._ttl:
            return self._reason
        if self._running is None:
            self._running = asyncio.create_task(self._check_storage())
            self._running.add_done_callback(self._finished)
        # Shielded: one prober hanging up must not cancel the check the
        # others are waiting for.
        return await asyncio.shield(self._running)

    def _finished(self, task: asyncio.Task[str | None]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self._reason = task.result()
            self._checked_at = self._clock()

    async def _check_storage(self) -> str | None:
        store = self._current_store()
        if store is None:
            return "storage is not open yet"
        if not isinstance(store, HealthCheck):
            return None  # nothing to check beyond having opened it
        try:
            async with asyncio.timeout(self._timeout):
                await store.check_health()
        except TimeoutError:
            reason = f"the storage health check took longer than {self._timeout:g}s"
        except UploadError as exc:
            reason = exc.message
        except Exception as exc:
            # A bug in a store's check must still read as "not ready", not a 500.
            log.exception("storage health check failed unexpectedly")
            reason = f"{type(exc).__name__}: {exc}"
        else:
            return None
        log.warning("not ready: %s", reason)
        return reason
