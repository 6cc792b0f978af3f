"""Application factory: routes, resources opened and closed with the app, and
the middleware that turns every error into a JSON response and logs each request."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from app import handlers, keys
from app.auth import Authorizer, make_authorizer
from app.callbacks import CompletionNotifier
from app.config import Config
from app.digests import crc32c_b64
from app.errors import UploadError
from app.locking import WriterRegistry
from app.stores import open_store
from app.stores.base import CallbackOutbox, Store, UploadInfo
from app.uploads import UploadEngine

log = logging.getLogger("app.server")
access_log = logging.getLogger("app.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: UploadError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers())


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
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
        access_log.info(
            "%s %s %d",
            request.method,
            request.path,
            status,
            extra={
                "request_id": request_id,
                "method": request.method,
                "upload_name": request.match_info.get("name"),
                "action": request.get(keys.REQUEST_ACTION),
                "status": status,
                "bytes": request.get(keys.REQUEST_STORED, 0),
                "offset": request.get(keys.REQUEST_OFFSET),
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "remote": request.remote,
            },
        )


def create_app(
    config: Config, *, store: Store | None = None, authorizer: Authorizer | None = None
) -> web.Application:
    """Build the app. ``store`` and ``authorizer`` may be injected (tests, embedding);
    an injected store is left open for its owner to close."""
    app = web.Application(middlewares=[errors_and_access_log], client_max_size=1024 * 1024)
    app[keys.CONFIG] = config
    writers = WriterRegistry(config.storage.takeover_timeout)
    app[keys.WRITERS] = writers

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            app[keys.HTTP_CLIENT] = session
            own_store = store is None
            active_store = await open_store(config.storage) if store is None else store
            try:
                app[keys.STORE] = active_store
                app[keys.AUTHORIZER] = authorizer or make_authorizer(config.auth, session)
                outbox = active_store if isinstance(active_store, CallbackOutbox) else None
                notifier = CompletionNotifier(config.callbacks, outbox, session)
                app[keys.NOTIFIER] = notifier

                async def on_complete(info: UploadInfo) -> None:
                    await notifier.notify(completion_payload(info), callback_id=info.session_id)

                app[keys.ENGINE] = UploadEngine(
                    active_store, config.storage, writers, on_complete=on_complete
                )
                redelivery = (
                    asyncio.create_task(_redeliver(notifier)) if notifier.enabled else None
                )
                yield
                if redelivery is not None:
                    redelivery.cancel()
                await notifier.close(timeout=5.0)
            finally:
                if own_store:
                    await active_store.close()

    async def stop_writers(app: web.Application) -> None:
        # Running uploads persist what they hold and answer before the server
        # closes their connections.
        writers.stop_all()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(stop_writers)
    for method, view in (("PUT", handlers.put_upload), ("POST", handlers.post_upload),
                         ("DELETE", handlers.delete_upload)):
        app.router.add_route(method, "/upload/{name:.+}", view,
                             expect_handler=handlers.expect_continue)
    return app


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
