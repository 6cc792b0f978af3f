"""CORS and cross-site writes on the wire, for every dialect's paths; the
308 workaround; the static assets. The real app on a real port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from app.auth.webhook import AuthRequest
from app.core.grant import Grant
from app.http.static_views import DEFAULT_UPPY_DIST
from tests.http_support import Proxy, ProxyFactory
from tests.stores.fixtures import storage_config

ALLOWED = "http://allowed.test:3000"
EVIL = "https://evil.test"
#: One path per dialect, with the method its clients send first.
DIALECT_PATHS = [
    ("PUT", "/upload/videos/a.bin"),                                        # ours
    ("POST", "/upload/storage/v1/b/media/o?uploadType=resumable&name=a"),   # Google JSON API
    ("POST", "/files/"),                                                    # tus / IETF create
    ("PATCH", "/files/0123456789abcdef"),                                   # tus / IETF append
    ("DELETE", "/files/0123456789abcdef"),
]


class CountingAuthorizer:
    def __init__(self) -> None:
        self.requests: list[AuthRequest] = []

    async def authorize(self, request: AuthRequest) -> Grant:
        self.requests.append(request)
        return Grant()


@pytest.fixture
def auth() -> CountingAuthorizer:
    return CountingAuthorizer()


@pytest.fixture
async def proxy(tmp_path: Path, auth: CountingAuthorizer) -> AsyncIterator[Proxy]:
    factory = ProxyFactory(storage_config("filesystem", tmp_path, None, None))
    yield await factory.start(authorizer=auth, cors={"allowed_origins": [ALLOWED]},
                              server={"demo_page": True}, gcs={"buckets": {"media": "media/"}})
    await factory.stop_all()


def header_set(value: str | None) -> set[str]:
    return {v.strip().lower() for v in (value or "").split(",") if v.strip()}


@pytest.mark.parametrize(("method", "path"), DIALECT_PATHS)
async def test_preflight_for_every_dialect_never_asks_auth(
    proxy: Proxy, http: aiohttp.ClientSession, auth: CountingAuthorizer, method: str, path: str
) -> None:
    async with http.options(proxy.url + path, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-range,tus-resumable,upload-offset",
    }) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert method.lower() in {m.lower() for m in header_set(
            resp.headers["Access-Control-Allow-Methods"])}
        assert {"content-range", "tus-resumable", "upload-offset"} <= header_set(
            resp.headers["Access-Control-Allow-Headers"])
        assert resp.headers["Access-Control-Max-Age"] == "600"
        assert "origin" in header_set(resp.headers["Vary"])
        assert "Access-Control-Allow-Credentials" not in resp.headers
    assert auth.requests == []


@pytest.mark.parametrize(("method", "path"), DIALECT_PATHS)
async def test_preflight_from_a_disallowed_origin_gets_no_cors_headers(
    proxy: Proxy, http: aiohttp.ClientSession, auth: CountingAuthorizer, method: str, path: str
) -> None:
    async with http.options(proxy.url + path, headers={
        "Origin": EVIL, "Access-Control-Request-Method": method}) as resp:
        assert resp.status == 403
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
        assert "origin" in header_set(resp.headers["Vary"])
    assert auth.requests == []


async def test_plain_options_is_left_to_the_routes(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    # Our dialect has no OPTIONS route: without Access-Control-Request-Method
    # the request is no preflight, and the router answers it.
    async with http.options(proxy.url + "/upload/a.bin", headers={"Origin": ALLOWED}) as resp:
        assert resp.status == 405
        assert "Access-Control-Allow-Methods" not in resp.headers


async def test_allowed_origin_reads_answers_with_exposed_headers(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    url = proxy.url + "/upload/cors/a.bin"
    headers = {"Origin": ALLOWED}
    async with http.put(url, data=b"x" * 1000, headers={
            **headers, "Content-Range": "bytes 0-999/2000"}) as resp:
        assert resp.status == 308
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
        exposed = header_set(resp.headers["Access-Control-Expose-Headers"])
        assert {"range", "location", "x-request-id", "retry-after", "upload-offset",
                "tus-resumable", "x-http-status-code-override", "x-guploader-uploadid",
                "upload-limit", "upload-expires"} <= exposed
        assert "origin" in header_set(resp.headers["Vary"])
    async with http.put(url, data=b"y" * 10, headers={
            **headers, "Content-Range": "bytes 5000-5009/2000"}) as resp:
        # Errors carry CORS headers too, or a page could not read why it failed.
        assert resp.status == 400
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_credentials_only_when_configured(tmp_path: Path, http: aiohttp.ClientSession
                                                ) -> None:
    factory = ProxyFactory(storage_config("filesystem", tmp_path, None, None))
    try:
        proxy = await factory.start(cors={"allowed_origins": ["http://*.allowed.test:3000"],
                                          "allow_credentials": True, "max_age": "1m"})
        async with http.options(proxy.url + "/upload/a", headers={
                "Origin": "http://app.allowed.test:3000",
                "Access-Control-Request-Method": "PUT"}) as resp:
            assert resp.headers["Access-Control-Allow-Credentials"] == "true"
            assert resp.headers["Access-Control-Allow-Origin"] == "http://app.allowed.test:3000"
            assert resp.headers["Access-Control-Max-Age"] == "60"
    finally:
        await factory.stop_all()


async def probe_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.put(url, headers={"Content-Range": "bytes */*"}) as resp:
        return resp.status


@pytest.mark.parametrize("headers", [
    {"Origin": EVIL, "Content-Type": "text/plain"},
    {"Origin": EVIL, "Content-Type": "application/x-www-form-urlencoded"},
    {"Origin": "null", "Content-Type": "multipart/form-data; boundary=x"},
    {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
])
async def test_cross_site_simple_post_creates_nothing(
    proxy: Proxy, http: aiohttp.ClientSession, auth: CountingAuthorizer, headers: dict[str, str]
) -> None:
    url = proxy.url + "/upload/victim/a.bin"
    async with http.post(url, data=b"hello", headers=headers) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "cross_site_request"
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert auth.requests == []
    assert await probe_status(http, url) == 404


async def test_cross_site_writes_cannot_touch_an_unfinished_upload(
    proxy: Proxy, http: aiohttp.ClientSession, auth: CountingAuthorizer
) -> None:
    url = proxy.url + "/upload/victim/b.bin"
    async with http.put(url, data=b"a" * 100, headers={"Content-Range": "bytes 0-99/200"}) as r:
        assert r.status == 308
    calls = len(auth.requests)
    for method, extra in [("PUT", {}), ("POST", {}), ("DELETE", {}),
                          ("PUT", {"X-HTTP-Method-Override": "DELETE"})]:
        async with http.request(method, url, data=b"b" * 10,
                                headers={"Origin": EVIL, **extra}) as resp:
            assert resp.status == 403, method
    assert len(auth.requests) == calls
    async with http.put(url, headers={"Content-Range": "bytes */200"}) as resp:
        assert resp.status == 308
        assert resp.headers["Range"] == "bytes=0-99"


def answer_without_body(port: int, head: str) -> bytes:
    """Send only the head of a request announcing a large body, and read the
    answer's head: it can only arrive if the server never waited for the body."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n")
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


async def test_cross_site_refusal_reads_no_body_byte(
    proxy: Proxy, auth: CountingAuthorizer
) -> None:
    head = ("POST /upload/victim/c.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Origin: {EVIL}\r\nContent-Type: text/plain\r\nContent-Length: 10000000")
    answer = await asyncio.to_thread(answer_without_body, proxy.port, head)
    assert answer.startswith(b"HTTP/1.1 403")
    assert auth.requests == []


@pytest.mark.parametrize("origin", [None, "own", ALLOWED])
async def test_writes_without_origin_from_the_own_or_an_allowed_origin_pass(
    proxy: Proxy, http: aiohttp.ClientSession, origin: str | None
) -> None:
    headers = {} if origin is None else {"Origin": proxy.url if origin == "own" else origin}
    async with http.put(proxy.url + "/upload/ok.bin", data=b"z" * 10, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["size"] == 10


async def test_no_308_header_turns_incomplete_states_into_200(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    url = proxy.url + "/upload/no308.bin"
    no308 = {"X-GUploader-No-308": "yes"}
    async with http.put(url, data=b"a" * 100, headers={
            **no308, "Content-Range": "bytes 0-99/300"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Http-Status-Code-Override"] == "308"
        assert resp.headers["Range"] == "bytes=0-99"
        assert await resp.read() == b""
    async with http.put(url, headers={**no308, "Content-Range": "bytes */300"}) as resp:
        assert (resp.status, resp.headers["Range"]) == (200, "bytes=0-99")
        assert resp.headers["X-Http-Status-Code-Override"] == "308"
    async with http.put(url, headers={"Content-Range": "bytes */300"}) as resp:
        assert resp.status == 308
        assert "X-Http-Status-Code-Override" not in resp.headers
    async with http.put(url, data=b"b" * 200, headers={
            **no308, "Content-Range": "bytes 100-299/300"}) as resp:
        assert resp.status == 200
        assert "X-Http-Status-Code-Override" not in resp.headers
        assert (await resp.json())["size"] == 300


async def test_static_uploader_content_type_and_caching(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    url = proxy.url + "/static/resumable-upload.js"
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        etag = resp.headers["ETag"]
        assert "export class ResumableUpload" in await resp.text()
    async with http.get(url, headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
    for missing in ("/static/nope.js", "/static/..%2Fapp.yaml", "/static/demo.html"):
        async with http.get(proxy.url + missing) as resp:
            assert resp.status == 404, missing


async def test_demo_pages_only_when_switched_on(
    proxy: Proxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    for path in ("/", "/demo/uppy"):
        async with http.get(proxy.url + path) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    factory = ProxyFactory(storage_config("filesystem", tmp_path / "off", None, None))
    try:
        off = await factory.start(server={"demo_page": False})
        for path in ("/", "/demo/uppy"):
            async with http.get(off.url + path) as resp:
                assert resp.status == 404
        async with http.get(off.url + "/static/resumable-upload.js") as resp:
            assert resp.status == 200
    finally:
        await factory.stop_all()


async def test_uppy_page_names_the_tus_path_and_serves_only_uppy_bundle_files(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    async with http.get(proxy.url + "/demo/uppy") as resp:
        assert '<meta name="tus-endpoint" content="/files/">' in await resp.text()
    async with http.get(proxy.url + "/demo/uppy/vendor/uppy.min.mjs") as resp:
        if (DEFAULT_UPPY_DIST / "uppy.min.mjs").exists():  # a developer installed it here
            assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
        else:  # the answer says what to install
            assert resp.status == 404
            assert "npm install --no-save uppy@6" in (await resp.json())["message"]
    async with http.get(proxy.url + "/demo/uppy/vendor/package.json") as resp:
        assert resp.status == 404
