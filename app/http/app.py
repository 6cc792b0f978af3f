"""The app factory: resources opened and closed with the app, the dialects
mounted on the shared edge, and the operators' endpoints.

The concrete store is chosen by the caller (``app.service``), so nothing in
the HTTP layer depends on how or where bytes are stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from app.auth.webhook import Authorizer, AuthRequest, make_authorizer
from app.callbacks.intents import completion_payload, notifier_for
from app.callbacks.notifier import CompletionNotifier
from app.config import Config, StorageConfig
from app.core.budget import MemoryBudget
from app.core.grant import Grant
from app.engine.engine import UploadEngine
from app.engine.writers import WriterRegistry
from app.errors import AuthRefused, AuthUnavailable, Forbidden, Unauthorized
from app.http import keys, ops_views, static_views
from app.http.cors_middleware import CORS_POLICY, add_cors_headers, cors_guard, policy_for
from app.http.dialect import Dialect, mount
from app.http.dialects.gcs import GcsDialect
from app.http.dialects.ietf import IetfDialect
from app.http.dialects.ours import OurDialect
from app.http.dialects.tus import TusDialect
from app.http.middleware import errors_and_access_log
from app.ops.health import Readiness
from app.ops.metrics import Metrics
from app.stores.base import Store, UploadInfo

__all__ = ["build_app", "completion_payload", "dialects_for"]

log = logging.getLogger("app.server")

#: aiohttp's body buffer per request (its default is 256 KiB): it stops reading
#: the socket once twice this is buffered and unread. A request waiting for the
#: memory budget then holds that, one socket read past it (asyncio reads up to
#: 256 KiB at a time) and the chunk it read last; docs/performance.md has the
#: measured cost per connection. Smaller buffers only pause reading more often.
READ_BUFFER = 16 * 1024

StoreOpener = Callable[[StorageConfig, MemoryBudget], Awaitable[Store]]


def dialects_for(config: Config) -> list[Dialect]:
    """The wire dialects this configuration serves. Google's paths come before
    ours, which would otherwise take every ``/upload/...``; on a shared path
    the first whose route accepts a request gets it (IETF before tus)."""
    return [GcsDialect(config.gcs), OurDialect(), IetfDialect(config), TusDialect(config.tus)]


class MeasuredAuthorizer:
    """Times every authorization and counts its outcome, around any Authorizer."""

    def __init__(self, inner: Authorizer, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics

    async def authorize(self, request: AuthRequest) -> Grant:
        started = time.perf_counter()
        outcome = "error"
        try:
            grant = await self.inner.authorize(request)
            outcome = "allowed"
            return grant
        except Unauthorized:
            outcome = "unauthorized"
            raise
        except Forbidden:
            outcome = "forbidden"
            raise
        except AuthRefused:
            outcome = "refused"
            raise
        except AuthUnavailable:
            outcome = "unavailable"
            raise
        finally:
            self._metrics.auth_duration.observe(time.perf_counter() - started)
            self._metrics.auth_decisions.labels(outcome).inc()

    def __getattr__(self, name: str) -> Any:
        # Whatever else the wrapped authorizer offers (its call counter, for
        # one) stays reachable through the app key.
        return getattr(self.inner, name)


def build_app(
    config: Config,
    *,
    open_store: StoreOpener,
    store: Store | None = None,
    authorizer: Authorizer | None = None,
    readiness_ttl: float | None = None,
    clock: Callable[[], float] = time.time,
    budget: MemoryBudget | None = None,
) -> web.Application:
    """Build the app. ``clock`` is the engine's wall clock (upload expiry);
    ``store`` and ``authorizer`` may be injected (tests, embedding);
    an injected store is left open for its owner to close, otherwise
    ``open_store`` opens one at start-up. ``readiness_ttl`` overrides how long a
    ``/readyz`` answer is reused (0: check every time). ``budget``: the memory
    budget the app's requests share (pass the one an injected store was opened
    with); by default a new one, as ``storage.memory_budget`` says."""
    # CORS inside the error middleware, so its refusals are logged and rendered
    # like any other error, and before every route, so before auth and body.
    app = web.Application(middlewares=[errors_and_access_log, cors_guard],
                          client_max_size=1024 * 1024,
                          handler_args={"read_bufsize": READ_BUFFER})
    app[keys.CONFIG] = config
    app[CORS_POLICY] = policy_for(config.cors)
    app.on_response_prepare.append(add_cors_headers)
    writers = WriterRegistry(config.storage.takeover_timeout)
    app[keys.WRITERS] = writers
    metrics = Metrics()
    app[keys.METRICS] = metrics
    metrics.track_writers(writers)
    metrics.track_store(lambda: app.get(keys.STORE))
    if budget is None:
        budget = MemoryBudget(config.storage.memory_budget, wait=config.storage.budget_wait)
    app[keys.BUDGET] = budget
    metrics.track_budget(budget)
    if readiness_ttl is None:
        readiness_ttl = config.server.readiness_cache_ttl
    readiness = Readiness(lambda: app.get(keys.STORE), ttl=readiness_ttl)
    app[keys.READINESS] = readiness

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # One pool each: a hung callback receiver must not delay authorization.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.auth.max_connections, limit_per_host=0)
        ) as auth_session, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=config.callbacks.max_connections, limit_per_host=0
            )
        ) as callbacks_session:
            own_store = store is None
            active_store = await open_store(config.storage, budget) if store is None else store
            try:
                app[keys.STORE] = active_store
                metrics.track_calls(active_store)
                inner = authorizer or make_authorizer(config.auth, auth_session)
                if isinstance(getattr(inner, "calls", None), int):
                    metrics.track_webhook_calls(lambda: getattr(inner, "calls", 0))
                app[keys.AUTHORIZER] = MeasuredAuthorizer(inner, metrics)
                notifier = notifier_for(config.callbacks, active_store, callbacks_session)
                app[keys.NOTIFIER] = notifier
                metrics.track_callbacks(notifier)

                async def on_complete(info: UploadInfo) -> None:
                    # The engine calls this once per upload it finishes (never
                    # for repeat requests to a completed one): the exact count.
                    metrics.uploads_completed.inc()
                    # With the intent in the record, a failed outbox write can
                    # no longer turn a completed upload into a 503.
                    await notifier.notify(completion_payload(info), callback_id=info.session_id,
                                          recorded=info.notify_pending, record=info.name)

                async def on_notice_pending(info: UploadInfo, replacing: bool) -> None:
                    # Replacing or dropping the record would drop the intent:
                    # the outbox keeps the callback from then on.
                    await notifier.notify(completion_payload(info), callback_id=info.session_id,
                                          recorded=not replacing, record=info.name)

                app[keys.ENGINE] = UploadEngine(
                    active_store, config.storage, writers,
                    on_start=lambda info: metrics.uploads_started.inc(),
                    on_complete=on_complete,
                    clock=clock,
                    on_notice_pending=on_notice_pending if notifier.enabled else None,
                    budget=budget,
                )
                redelivery = (
                    asyncio.create_task(_redeliver(notifier)) if notifier.enabled else None
                )
                log.info("ready: %s store open, accepting uploads", config.storage.backend)
                yield
                if redelivery is not None:
                    redelivery.cancel()
                await notifier.close(timeout=5.0)
            finally:
                if own_store:
                    await active_store.close()

    async def stop_writers(app: web.Application) -> None:
        # Running uploads persist what they hold and answer before the server
        # closes their connections; load balancers still probing see "not ready".
        readiness.shutting_down = True
        if writers.active:
            log.info("shutting down: %d running uploads asked to persist what arrived",
                     writers.active)
        writers.stop_all()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(stop_writers)
    app.router.add_get("/healthz", ops_views.healthz, allow_head=True)
    app.router.add_get("/readyz", ops_views.readyz, allow_head=True)
    app.router.add_get("/metrics", ops_views.metrics_view)
    static_views.add_routes(app, demo_page=config.server.demo_page)
    mount(app, dialects_for(config))
    return app


async def _redeliver(notifier: CompletionNotifier) -> None:
    try:
        delivered, pending = await notifier.redeliver_pending()
        if delivered or pending:
            log.info("completion callbacks left from before: %d delivered, %d still pending",
                     delivered, pending)
    except Exception:
        log.exception("redelivering pending completion callbacks failed")
