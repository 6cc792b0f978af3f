"""The browser assets: ``/static/`` (the JavaScript uploader, always served)
and the demo pages (``/``, ``/demo/uppy``; only with ``server.demo_page``).

Uppy is not part of the repository: the Uppy demo serves the prebuilt bundle
of the npm package ``uppy`` from ``UPPY_DIST`` (by default
``node_modules/uppy/dist`` under the working directory, where
``npm install --no-save uppy@6`` puts it).
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import re
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from app.http import keys
from app.http.dialect import Handler

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
UPPY_DIST = web.AppKey("uppy_dist", Path)
DEFAULT_UPPY_DIST = Path("node_modules/uppy/dist")

_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: The only files of Uppy's bundle the demo needs.
_UPPY_FILES = frozenset({"uppy.min.mjs", "uppy.min.css"})


def add_routes(app: web.Application, *, demo_page: bool) -> None:
    app.router.add_get("/static/{file}", static_file, allow_head=True)
    if demo_page:
        app.router.add_get("/", page("demo.html"), allow_head=True)
        app.router.add_get("/demo/", page("demo.html"), allow_head=True)
        app.router.add_get("/demo/uppy", uppy_page, allow_head=True)
        app.router.add_get("/demo/uppy/vendor/{file}", uppy_file, allow_head=True)


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if not _FILE_NAME.fullmatch(name) or name.endswith(".html"):
        raise web.HTTPNotFound(text="no such file")
    return await _serve(request, STATIC_DIR / name)


async def uppy_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if name not in _UPPY_FILES:
        raise web.HTTPNotFound(text="no such file")
    dist = request.app.get(UPPY_DIST, DEFAULT_UPPY_DIST)
    return await _serve(request, dist / name, missing=(
        "Uppy is not installed: run 'npm install --no-save uppy@6' in the directory "
        "the service runs in"))


def page(name: str) -> Handler:
    async def view(request: web.Request) -> web.StreamResponse:
        return await _serve(request, STATIC_DIR / name)
    return view


async def uppy_page(request: web.Request) -> web.StreamResponse:
    # The page learns where tus lives from the configuration, not from a guess.
    tus_path = html.escape(request.app[keys.CONFIG].tus.path, quote=True)
    return await _serve(request, STATIC_DIR / "uppy.html",
                        fill=lambda data: data.replace(b"__TUS_PATH__", tus_path.encode()))


async def _serve(request: web.Request, path: Path, missing: str = "no such file",
                 fill: Callable[[bytes], bytes] | None = None) -> web.StreamResponse:
    content_type = _CONTENT_TYPES.get(path.suffix)
    if content_type is None:
        raise web.HTTPNotFound(text="no such file")
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except (FileNotFoundError, IsADirectoryError):
        raise web.HTTPNotFound(text=missing) from None
    if fill is not None:
        data = fill(data)
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    # URLs carry no version: a browser keeps its copy but asks each time
    # whether it is still current, so a deployed fix is picked up at once.
    headers = {"Cache-Control": "no-cache", "ETag": etag, "X-Content-Type-Options": "nosniff"}
    if etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    return web.Response(body=data, headers={**headers, "Content-Type": content_type})
