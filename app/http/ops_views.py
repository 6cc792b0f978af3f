"""Views for operators: ``/healthz``, ``/readyz`` and ``/metrics``.

``GET /healthz`` says the process is up and its event loop answers; it does no
I/O, so a slow or broken storage backend never gets a healthy process killed.
``GET /readyz`` reports ``Readiness`` (the store's own health check, cached).
"""

from __future__ import annotations

from aiohttp import web

from app.http import keys


async def healthz(request: web.Request) -> web.Response:
    request[keys.REQUEST_ACTION] = "healthz"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    request[keys.REQUEST_ACTION] = "readyz"
    readiness = request.app[keys.READINESS]
    reason = await readiness.check()
    if reason is None:
        return web.json_response({"status": "ok"})
    code = "shutting_down" if readiness.shutting_down else "storage_unavailable"
    return web.json_response({"error": code, "message": reason}, status=503)


async def metrics_view(request: web.Request) -> web.Response:
    request[keys.REQUEST_ACTION] = "metrics"
    body, content_type = request.app[keys.METRICS].render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})
