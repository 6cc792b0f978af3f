"""The Uppy demo in real Chromium: Uppy's Dashboard with @uppy/tus uploads two
files through the tus endpoint at ``tus.path``.

Uppy is installed with npm at test time (the ``uppy`` bundle package, whose
prebuilt ``dist/uppy.min.mjs`` the proxy serves), never committed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from app.config import replace
from app.http.static_views import UPPY_DIST
from app.service import create_app
from tests.node_support import node_packages
from tests.stores.fixtures import storage_config

TUS_MISSING = importlib.util.find_spec("app.http.dialects.tus") is None
REASON = "the tus dialect (app/http/dialects/tus.py) is not in this tree yet: no endpoint for Uppy"
if TUS_MISSING:
    print(REASON)
pytestmark = pytest.mark.skipif(TUS_MISSING, reason=REASON)

UPPY = "uppy@6"
FILES = {"first.bin": 3 * 1024 * 1024 + 17, "second.txt": 200_000}


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    dist = node_packages(UPPY) / "node_modules" / "uppy" / "dist"
    config = replace(storage_config("filesystem", tmp_path, None, None),
                     server={"demo_page": True})
    app = create_app(config)
    app[UPPY_DIST] = dist
    runner = web.AppRunner(app, shutdown_timeout=5, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", Path(config.storage.filesystem.root)
    await runner.cleanup()


async def test_uppy_dashboard_uploads_two_files_over_tus(
    browser, service: tuple[str, Path], tmp_path: Path, screenshot_path
) -> None:
    url, root = service
    contents = {name: os.urandom(size) for name, size in FILES.items()}
    paths = []
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    page = await browser.new_page()
    await page.goto(url + "/demo/uppy")
    await page.wait_for_function("window.uppyDemo && window.uppyDemo.uppy")
    await page.locator("input.uppy-Dashboard-input").first.set_input_files(paths)
    await page.locator(".uppy-StatusBar-actionBtn--upload").click()
    await page.wait_for_function("window.uppyDemo.result !== null", timeout=60_000)
    result = await page.evaluate("window.uppyDemo.result")
    await page.screenshot(path=screenshot_path("uppy-done"), full_page=True)
    assert result["failed"] == []
    assert sorted(f["name"] for f in result["successful"]) == sorted(FILES)
    tus_path = "/files/"
    async with aiohttp.ClientSession() as http:
        for uploaded in result["successful"]:
            assert uploaded["uploadURL"].startswith(url + tus_path), uploaded
            async with http.head(uploaded["uploadURL"],
                                 headers={"Tus-Resumable": "1.0.0"}) as resp:
                assert resp.status == 200
                assert int(resp.headers["Upload-Offset"]) == FILES[uploaded["name"]]
    for name, data in contents.items():
        assert (root / "tus" / name).read_bytes() == data
