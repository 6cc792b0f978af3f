"""The middleware every request passes: request id, error rendering in the
dialect's own shape, one access-log line and the request metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from aiohttp import web

from app.errors import UploadError
from app.http import keys
from app.http.dialect import DIALECT, Handler
from app.http.dialects.ours import error_response
from app.ops.metrics import Metrics

log = logging.getLogger("app.server")
access_log = logging.getLogger("app.access")

#: A client's X-Request-Id is kept if it is a plausible id: printable ASCII
#: without spaces, bounded, so it cannot forge log lines or bloat them.
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
#: Endpoints probed every few seconds: logged at DEBUG unless they fail.
_OPS_ACTIONS = frozenset({"healthz", "readyz", "metrics"})
_UPLOAD_ACTIONS = frozenset({"create", "append", "status", "cancel"})


def request_id_for(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def render_error(request: web.Request, error: UploadError) -> web.StreamResponse:
    dialect = request.get(DIALECT)
    return error_response(error) if dialect is None else dialect.render_error(error)


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_for(request)
    started = time.perf_counter()
    status = 500
    try:
        try:
            response = await handler(request)
        except UploadError as exc:
            response = render_error(request, exc)
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
        if status >= 400 and request.can_read_body and not request.content.is_eof():
            await close_after_answer(request, response)
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
                "dialect": request.get(keys.REQUEST_DIALECT),
                "upload_name": request.get(keys.REQUEST_NAME, request.match_info.get("name")),
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


#: Body bytes still read after an early error answer, so that the answer
#: reaches the client before the close (a close with unread data becomes a
#: TCP reset, which may destroy the answer in the client's buffers).
CLOSE_DRAIN_LIMIT = 256 * 1024
#: ... and for at most this long.
CLOSE_DRAIN_SECONDS = 1.0


async def close_after_answer(request: web.Request, response: web.StreamResponse) -> None:
    """Answer an error whose request body was not read, then close the
    connection instead of reading the rest of the body.

    aiohttp would otherwise linger after the handler: up to 10 s of reading
    and discarding whatever a refused client sends (gigabytes from a fast
    one). Only its ``force_close`` flag skips that."""
    response.force_close()  # Connection: close
    try:
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
        transport = request.transport
        if transport is not None and transport.can_write_eof():
            # FIN right after the answer: a client reading to the end has it
            # all before the reset that closing with unread data may cause.
            transport.write_eof()
        drained = 0
        async with asyncio.timeout(CLOSE_DRAIN_SECONDS):
            while drained < CLOSE_DRAIN_LIMIT:
                data = await request.content.readany()
                if not data:
                    break
                drained += len(data)
    except Exception:
        pass  # the client is gone, slow, or its body broken: close anyway
    finally:
        request.protocol.force_close()


def _count_request(
    metrics: Metrics, request: web.Request, action: str | None, status: int, elapsed: float
) -> None:
    label = action or "none"
    dialect = request.get(keys.REQUEST_DIALECT, "none")
    metrics.http_requests.labels(dialect, label, str(status)).inc()
    metrics.http_request_duration.labels(dialect, label).observe(elapsed)
    metrics.bytes_received.inc(request.get(keys.REQUEST_RECEIVED, 0))
    metrics.bytes_stored.inc(request.get(keys.REQUEST_STORED, 0))
    if action == "cancel" and status == 204:
        metrics.uploads_cancelled.inc()
    if action in _UPLOAD_ACTIONS and status >= 500:
        metrics.uploads_failed.inc()
