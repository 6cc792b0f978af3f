"""The demo page in real Chromium: an upload across two dropped connections,
and a page reload mid-upload that resumes from the probed offset."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from app.auth.webhook import AuthRequest
from app.core.grant import Grant
from app.errors import AuthUnavailable
from tests.browser.cutting_relay import CuttingRelay
from tests.http_support import Proxy, ProxyFactory
from tests.stores.fixtures import storage_config

MIB = 1024 * 1024
FINISHED = "['done', 'failed'].includes(window.demo.uploads[0]?.state)"


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Proxy]:
    factory = ProxyFactory(storage_config("filesystem", tmp_path, None, None))
    yield await factory.start(server={"demo_page": True})
    await factory.stop_all()


def stored(proxy: Proxy, name: str) -> bytes:
    return (Path(proxy.config.storage.filesystem.root) / name).read_bytes()


async def test_upload_survives_two_dropped_connections(
    browser, proxy: Proxy, tmp_path: Path, screenshot_path
) -> None:
    data = os.urandom(30 * MIB)
    path = tmp_path / "dropped.bin"
    path.write_bytes(data)
    # Cuts inside the second and the third 8 MiB chunk (counts include headers).
    with CuttingRelay(proxy.port, cut_at=[9 * MIB, 21 * MIB]) as relay:
        page = await browser.new_page()
        await page.goto(relay.url + "/")
        await page.set_input_files("#files", str(path))
        for drop in (1, 2):
            assert await asyncio.to_thread(relay.wait_down, drop)
            # The link comes back once the page has noticed it was gone.
            await page.wait_for_function(f"window.demo.uploads[0].retries >= {drop}")
            await page.wait_for_selector(".upload.waiting")
            await page.screenshot(path=screenshot_path(f"demo-drop-{drop}"), full_page=True)
            relay.restore()
        await page.wait_for_function(FINISHED, timeout=60_000)
        entry = await page.evaluate("window.demo.uploads[0]")
        width = await page.eval_on_selector(".upload .fill", "el => el.style.width")
        status = await page.inner_text(".upload .status")
        await page.screenshot(path=screenshot_path("demo-two-drops"), full_page=True)
    assert entry["state"] == "done", entry
    assert relay.cuts_done == 2
    assert entry["retries"] >= 2            # the uploader saw both drops itself
    assert len(entry["resumes"]) >= 2 and all(r > 0 for r in entry["resumes"])
    assert entry["percent"] == 100 and width == "100%"
    assert "matches the file" in status
    assert entry["object"]["size"] == len(data)
    assert stored(proxy, "demo/dropped.bin") == data


async def test_reload_mid_upload_resumes_from_the_probed_offset(
    browser, proxy: Proxy, tmp_path: Path, screenshot_path
) -> None:
    data = os.urandom(8 * MIB)
    path = tmp_path / "reloaded.bin"
    path.write_bytes(data)
    with CuttingRelay(proxy.port, hold_at=5 * MIB + MIB // 2) as relay:
        page = await browser.new_page()
        await page.goto(relay.url + "/?chunk=1048576")
        await page.set_input_files("#files", str(path))
        assert await asyncio.to_thread(relay.holding.wait, 30)
        before = await page.evaluate("window.demo.uploads[0]")
        acknowledged = before["chunks"][-1]  # the held chunk starts where the server was
        assert acknowledged >= 4 * MIB
        await page.reload()
        relay.release()  # the server sees the held request end, as the tab closed it
        sent_before_resume = relay.upstream_bytes
        await page.set_input_files("#files", str(path))
        await page.wait_for_function(FINISHED, timeout=60_000)
        after = await page.evaluate("window.demo.uploads[0]")
        await page.screenshot(path=screenshot_path("demo-after-reload"), full_page=True)
        sent_after_resume = relay.upstream_bytes - sent_before_resume
    assert after["state"] == "done", after
    probed = after["resumes"][0]
    assert probed >= acknowledged
    assert after["chunks"][0] == probed     # the first chunk after the reload starts there
    assert sent_after_resume < len(data) - probed + 64 * 1024
    assert stored(proxy, "demo/reloaded.bin") == data


class BrieflyUnavailable(AuthUnavailable):
    retry_after = 1


class FailsFirstAppend:
    """The auth webhook is down once, for the first chunk after the first."""

    def __init__(self) -> None:
        self.failed = False

    async def authorize(self, request: AuthRequest) -> Grant:
        if request.action == "append" and not self.failed:
            self.failed = True
            raise BrieflyUnavailable("auth webhook down")
        return Grant()


async def test_retry_after_is_honoured(browser, tmp_path: Path) -> None:
    data = os.urandom(2 * MIB)
    path = tmp_path / "later.bin"
    path.write_bytes(data)
    factory = ProxyFactory(storage_config("filesystem", tmp_path, None, None))
    auth = FailsFirstAppend()
    try:
        proxy = await factory.start(authorizer=auth, server={"demo_page": True})
        page = await browser.new_page()
        await page.goto(proxy.url + "/?chunk=1048576")
        await page.set_input_files("#files", str(path))
        await page.wait_for_function(FINISHED, timeout=30_000)
        entry = await page.evaluate("window.demo.uploads[0]")
    finally:
        await factory.stop_all()
    assert entry["state"] == "done", entry
    assert auth.failed
    assert entry["delays"] == [1]          # the server's Retry-After, not the backoff
    assert entry["resumes"] == [MIB]       # probed, then went on from the first chunk's end
    assert stored(proxy, "demo/later.bin") == data


async def test_cancel_mid_upload_deletes_the_session(
    browser, proxy: Proxy, tmp_path: Path
) -> None:
    path = tmp_path / "cancelled.bin"
    path.write_bytes(os.urandom(4 * MIB))
    with CuttingRelay(proxy.port, hold_at=2 * MIB + MIB // 2) as relay:
        page = await browser.new_page()
        await page.goto(relay.url + "/?chunk=1048576")
        await page.set_input_files("#files", str(path))
        assert await asyncio.to_thread(relay.holding.wait, 30)
        await page.click(".upload .cancel")
        await page.wait_for_selector(".upload.cancelled")
        saved = await page.evaluate(
            "Object.keys(localStorage).filter(k => k.startsWith('resumable-upload:'))")
        relay.release()
    assert saved == []
    async with aiohttp.ClientSession() as http, http.put(
            proxy.url + "/upload/demo/cancelled.bin",
            headers={"Content-Range": "bytes */*"}) as resp:
        assert resp.status == 404
