"""Pages on other origins (other ports) in real Chromium: an allowed origin
uploads through CORS; a disallowed one fails cleanly and its simple
cross-site POST creates nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from app.auth.webhook import AuthRequest
from app.core.grant import Grant
from app.http.static_views import STATIC_DIR
from tests.http_support import Proxy, ProxyFactory
from tests.stores.fixtures import storage_config

SIZE = 1024 * 1024 + 12345  # four full 256 KiB chunks and a short last one

#: The third-party page: its own copy of the uploader (a module script from
#: the service would itself need CORS), and a form-like simple POST.
PAGE = """<!doctype html><meta charset="utf-8"><title>third-party site</title>
<h1>A page on another origin</h1><p id="out">idle</p>
<script type="module">
import { ResumableUpload } from "/resumable-upload.js";
const bytes = (n) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + 7) & 255);
window.upload = async (endpoint, name, size) => {
  const file = new File([bytes(size)], "cross.bin", { type: "application/octet-stream" });
  const upload = new ResumableUpload(file, { endpoint, name, chunkSize: 262144, retryDelays: [] });
  try {
    const object = await upload.start();
    document.getElementById("out").textContent = `uploaded ${object.size} bytes`;
    return { ok: true, object };
  } catch (error) {
    document.getElementById("out").textContent = `refused: ${error.message}`;
    return { ok: false, error: error.message };
  }
};
window.simplePost = async (url) => {
  const answer = await fetch(url, { method: "POST", mode: "no-cors", body: "reset",
                                    headers: { "Content-Type": "text/plain" } });
  return answer.type;
};
window.ready = true;
</script>"""


def pattern(size: int) -> bytes:
    return bytes((i * 31 + 7) & 255 for i in range(size))


class CountingAuthorizer:
    def __init__(self) -> None:
        self.requests: list[AuthRequest] = []

    async def authorize(self, request: AuthRequest) -> Grant:
        self.requests.append(request)
        return Grant()


async def start_site() -> tuple[web.AppRunner, str]:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def uploader(request: web.Request) -> web.Response:
        return web.Response(body=(STATIC_DIR / "resumable-upload.js").read_bytes(),
                            content_type="text/javascript")

    site = web.Application()
    site.router.add_get("/", page)
    site.router.add_get("/resumable-upload.js", uploader)
    runner = web.AppRunner(site, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def sites() -> AsyncIterator[tuple[str, str]]:
    allowed, allowed_url = await start_site()
    refused, refused_url = await start_site()
    yield allowed_url, refused_url
    await allowed.cleanup()
    await refused.cleanup()


@pytest.fixture
def auth() -> CountingAuthorizer:
    return CountingAuthorizer()


@pytest.fixture
async def proxy(tmp_path: Path, sites: tuple[str, str], auth: CountingAuthorizer
                ) -> AsyncIterator[Proxy]:
    factory = ProxyFactory(storage_config("filesystem", tmp_path, None, None))
    yield await factory.start(authorizer=auth, cors={"allowed_origins": [sites[0]]})
    await factory.stop_all()


async def open_site(browser, url: str):
    page = await browser.new_page()
    await page.goto(url + "/")
    await page.wait_for_function("window.ready === true")
    return page


async def probe(proxy: Proxy, name: str) -> int:
    async with aiohttp.ClientSession() as http, http.put(
            f"{proxy.url}/upload/{name}", headers={"Content-Range": "bytes */*"}) as resp:
        return resp.status


async def refused_requests(proxy: Proxy) -> float:
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    lines = [line for line in text.splitlines()
             if line.startswith("upload_proxy_http_requests_total{") and 'status="403"' in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def test_allowed_origin_uploads_through_cors(
    browser, proxy: Proxy, sites: tuple[str, str], auth: CountingAuthorizer, screenshot_path
) -> None:
    page = await open_site(browser, sites[0])
    result = await page.evaluate("([u, n, s]) => window.upload(u, n, s)",
                                 [proxy.url, "cross/allowed.bin", SIZE])
    await page.screenshot(path=screenshot_path("cross-origin-allowed"))
    assert result["ok"], result
    assert result["object"]["size"] == SIZE
    stored = Path(proxy.config.storage.filesystem.root) / "cross/allowed.bin"
    assert stored.read_bytes() == pattern(SIZE)
    # POST, five chunks: the preflights themselves never reached the webhook.
    assert [r.action for r in auth.requests] == ["create", "create"] + ["append"] * 4


async def test_disallowed_origin_fails_cleanly_and_creates_nothing(
    browser, proxy: Proxy, sites: tuple[str, str], auth: CountingAuthorizer, screenshot_path
) -> None:
    page = await open_site(browser, sites[1])
    result = await page.evaluate("([u, n, s]) => window.upload(u, n, s)",
                                 [proxy.url, "cross/refused.bin", SIZE])
    await page.screenshot(path=screenshot_path("cross-origin-refused"))
    assert not result["ok"]
    assert result["error"] == "network error"  # all a page learns of a CORS refusal
    assert auth.requests == []
    assert await probe(proxy, "cross/refused.bin") == 404


async def test_simple_cross_site_post_from_a_disallowed_origin_creates_nothing(
    browser, proxy: Proxy, sites: tuple[str, str], auth: CountingAuthorizer
) -> None:
    page = await open_site(browser, sites[1])
    before = await refused_requests(proxy)
    kind = await page.evaluate("(u) => window.simplePost(u)", f"{proxy.url}/upload/victim.bin")
    assert kind == "opaque"                         # sent, without a preflight
    assert await refused_requests(proxy) == before + 1  # it arrived, and was refused
    assert auth.requests == []
    assert await probe(proxy, "victim.bin") == 404
