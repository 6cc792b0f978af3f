"""Application factory: routes, resources opened and closed with the app, and
the middleware that turns every error into a JSON response, logs each request
and counts it in the app's metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from app.auth.webhook import Authorizer, AuthRequest, Grant, make_authorizer
from app.callbacks.notifier import CompletionNotifier
from app.config import Config
from app.core.digests import crc32c_b64
from app.engine.engine import UploadEngine
from app.engine.writers import WriterRegistry
from app.errors import AuthRefused, AuthUnavailable, Forbidden, Unauthorized, UploadError
from app.http import keys
from app.http.dialects import ours as handlers
from app.ops.health import READINESS, Readiness, healthz, readyz
from app.ops.metrics import Metrics
from app.stores import open_store
from app.stores.base import CallbackOutbox, Store, UploadInfo

log = logging.getLogger("app.server")
access_log = logging.getLogger("app.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: UploadError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers())


#: A client's X-Request-Id is kept if it is a plausible id: printable ASCII
#: without spaces, bounded, so it cannot forge log lines or bloat them.
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
#: Endpoints probed every few seconds: logged at DEBUG unless they fail.
_OPS_ACTIONS = frozenset({"healthz", "readyz", "metrics"})
_UPLOAD_ACTIONS = frozenset({"create", "append", "status", "cancel"})


def request_id_for(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_for(request)
    started = time.perf_counter()
    status = 500
    try:
        try:
            response = await handler(request)
        except UploadError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            # Route misses and method errors get the same JSON shape as ours.
            if exc.status < 400:
                raise
            code = exc.reason.lower().replace(" ", "_")
            response = web.json_response(
                {"error": code, "message": exc.text or exc.reason},
                status=exc.status, headers={k: v for k, v in exc.headers.items()
                                            if k.lower() == "allow"},
            )
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499
            raise
        except Exception:
            log.exception("unexpected error handling %s %s", request.method, request.path)
            response = web.json_response(
                {"error": "internal_error",
                 "message": f"an unexpected error occurred; request id {request_id}"},
                status=500,
            )
        response.headers["X-Request-Id"] = request_id
        status = response.status
        return response
    finally:
        elapsed = time.perf_counter() - started
        action = request.get(keys.REQUEST_ACTION)
        metrics = request.app.get(keys.METRICS)
        if metrics is not None:
            _count_request(metrics, request, action, status, elapsed)
        # Never headers: they carry the credentials forwarded to the auth webhook.
        access_log.log(
            logging.DEBUG if action in _OPS_ACTIONS and status < 400 else logging.INFO,
            "%s %s %d",
            request.method,
            request.path,
            status,
            extra={
                "request_id": request_id,
                "method": request.method,
                "upload_name": request.match_info.get("name"),
                "action": action,
                "status": status,
                "bytes": request.get(keys.REQUEST_STORED, 0),
                "received": request.get(keys.REQUEST_RECEIVED, 0),
                "offset_before": request.get(keys.REQUEST_OFFSET_BEFORE),
                "offset": request.get(keys.REQUEST_OFFSET),
                "duration_ms": round(elapsed * 1000, 1),
                "remote": request.remote,
            },
        )


def _count_request(
    metrics: Metrics, request: web.Request, action: str | None, status: int, elapsed: float
) -> None:
    label = action or "none"
    metrics.http_requests.labels(label, str(status)).inc()
    metrics.http_request_duration.labels(label).observe(elapsed)
    metrics.bytes_received.inc(request.get(keys.REQUEST_RECEIVED, 0))
    metrics.bytes_stored.inc(request.get(keys.REQUEST_STORED, 0))
    if action == "cancel" and status == 204:
        metrics.uploads_cancelled.inc()
    if action in _UPLOAD_ACTIONS and status >= 500:
        metrics.uploads_failed.inc()


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


def create_app(
    config: Config,
    *,
    store: Store | None = None,
    authorizer: Authorizer | None = None,
    readiness_ttl: float | None = None,
) -> web.Application:
    """Build the app. ``store`` and ``authorizer`` may be injected (tests, embedding);
    an injected store is left open for its owner to close. ``readiness_ttl``
    overrides how long a ``/readyz`` answer is reused (0: check every time)."""
    app = web.Application(middlewares=[errors_and_access_log], client_max_size=1024 * 1024)
    app[keys.CONFIG] = config
    writers = WriterRegistry(config.storage.takeover_timeout)
    app[keys.WRITERS] = writers
    metrics = Metrics()
    app[keys.METRICS] = metrics
    metrics.track_writers(writers)
    metrics.track_store(lambda: app.get(keys.STORE))
    if readiness_ttl is None:
        readiness_ttl = config.server.readiness_cache_ttl
    readiness = Readiness(lambda: app.get(keys.STORE), ttl=readiness_ttl)
    app[READINESS] = readiness

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            app[keys.HTTP_CLIENT] = session
            own_store = store is None
            active_store = await open_store(config.storage) if store is None else store
            try:
                app[keys.STORE] = active_store
                metrics.track_calls(active_store)
                inner = authorizer or make_authorizer(config.auth, session)
                if isinstance(getattr(inner, "calls", None), int):
                    metrics.track_webhook_calls(lambda: getattr(inner, "calls", 0))
                app[keys.AUTHORIZER] = MeasuredAuthorizer(inner, metrics)
                outbox = active_store if isinstance(active_store, CallbackOutbox) else None
                notifier = CompletionNotifier(config.callbacks, outbox, session)
                app[keys.NOTIFIER] = notifier
                metrics.track_callbacks(notifier)

                async def on_complete(info: UploadInfo) -> None:
                    # The engine calls this once per upload it finishes (never
                    # for repeat requests to a completed one): the exact count.
                    metrics.uploads_completed.inc()
                    await notifier.notify(completion_payload(info), callback_id=info.session_id)

                app[keys.ENGINE] = UploadEngine(
                    active_store, config.storage, writers,
                    on_start=lambda info: metrics.uploads_started.inc(),
                    on_complete=on_complete,
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
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    app.router.add_get("/metrics", metrics_view)
    for method, view in (("PUT", handlers.put_upload), ("POST", handlers.post_upload),
                         ("DELETE", handlers.delete_upload)):
        app.router.add_route(method, "/upload/{name:.*}", view,
                             expect_handler=handlers.expect_continue)
    return app


async def metrics_view(request: web.Request) -> web.Response:
    request[keys.REQUEST_ACTION] = "metrics"
    body, content_type = request.app[keys.METRICS].render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _redeliver(notifier: CompletionNotifier) -> None:
    try:
        delivered, pending = await notifier.redeliver_pending()
        if delivered or pending:
            log.info("completion callbacks left from before: %d delivered, %d still pending",
                     delivered, pending)
    except Exception:
        log.exception("redelivering pending completion callbacks failed")


def completion_payload(info: UploadInfo) -> dict[str, object]:
    done = info.completed
    assert done is not None
    return {
        "name": info.name,
        "key": done.key,
        "bucket": done.bucket,
        "size": done.size,
        "content_type": info.content_type,
        "etag": done.etag,
        "crc32c": crc32c_b64(done.crc32c),
        "metadata": dict(info.metadata),
        "owner": info.owner,
        "completed_at": done.completed_at,
    }
