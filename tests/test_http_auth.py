"""End-to-end auth and completion-callback tests: the real proxy on a real port,
against every store, with a real second aiohttp app playing the main service.

The fake main service (``FakeMain``) answers the auth webhook and receives the
completion callbacks, and records everything it was sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from app.callbacks.intents import completion_payload
from app.callbacks.notifier import (
    CALLBACK_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    encode,
    verify,
)
from app.core.protocol import RESERVED_PREFIX
from tests import test_http
from tests.conftest import free_port
from tests.stores.fixtures import StoreHarness
from tests.test_http import put_range, stored_object

# The end-to-end fixtures of tests/test_http.py: a ProxyFactory over the
# parametrized store, and a client session.
proxies = test_http.proxies

MIB = 1024 * 1024
SECRET = "callback-secret"
#: What the fake main service knows: bearer token -> owner.
OWNERS = {"Bearer t1": "u1", "Bearer t2": "u2"}
T1 = {"Authorization": "Bearer t1"}
T2 = {"Authorization": "Bearer t2"}

AuthAnswer = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]


async def owner_by_token(document: dict[str, Any]) -> web.StreamResponse:
    """Allow known tokens (owner from the token, fixed metadata); 401 otherwise."""
    owner = OWNERS.get(document["headers"].get("Authorization", ""))
    if owner is None:
        return web.json_response({"message": "unknown token"}, status=401)
    return web.json_response({"metadata": {"user": "42"}, "owner": owner})


class FakeMain:
    """The main application: auth webhook at /auth, completion receiver at /callback."""

    def __init__(self) -> None:
        self.auth_calls: list[dict[str, Any]] = []
        self.auth: AuthAnswer = owner_by_token
        #: (headers, raw body) of every callback attempt, in arrival order.
        self.callbacks: list[tuple[CIMultiDictProxy[str], bytes]] = []
        #: Statuses for the next callback attempts, in order; 200 once exhausted.
        self.callback_statuses: list[int] = []
        #: Status actually answered to each callback attempt.
        self.answered: list[int] = []
        #: When set, callback attempts wait for it before answering.
        self.gate: asyncio.Event | None = None
        self.callback_arrived = asyncio.Event()
        self.base = ""

    @property
    def auth_url(self) -> str:
        return f"{self.base}/auth"

    @property
    def callback_url(self) -> str:
        return f"{self.base}/callback"

    async def handle_auth(self, request: web.Request) -> web.StreamResponse:
        document = await request.json()
        self.auth_calls.append(document)
        return await self.auth(document)

    async def handle_callback(self, request: web.Request) -> web.StreamResponse:
        self.callbacks.append((request.headers, await request.read()))
        self.callback_arrived.set()
        if self.gate is not None:
            # Bounded so the test server can shut down even if a test fails.
            await asyncio.wait_for(self.gate.wait(), 10)
        status = self.callback_statuses.pop(0) if self.callback_statuses else 200
        self.answered.append(status)
        return web.Response(status=status)


@pytest.fixture
async def main(aiohttp_server) -> FakeMain:
    fake = FakeMain()
    app = web.Application()
    app.router.add_post("/auth", fake.handle_auth)
    app.router.add_post("/callback", fake.handle_callback)
    server = await aiohttp_server(app)
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


def auth_config(url: str, **overrides: Any) -> dict[str, Any]:
    return {"webhook_url": url, "cache_ttl": 0, **overrides}


def callbacks_config(url: str, **overrides: Any) -> dict[str, Any]:
    return {"on_complete_url": url, "secret": SECRET, "backoff": 0.01, **overrides}


async def eventually(predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def probe_as(http: aiohttp.ClientSession, url: str, headers: dict[str, str],
                   total: str = "*") -> aiohttp.ClientResponse:
    async with http.put(url, headers={"Content-Range": f"bytes */{total}", **headers},
                        allow_redirects=False) as resp:
        await resp.read()
        return resp


class CountingBody:
    """An async-iterable request body that counts how much of it the client sent."""

    def __init__(self, data: bytes, piece: int = 256 * 1024) -> None:
        self.data = data
        self.piece = piece
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for at in range(0, len(self.data), self.piece):
            piece = self.data[at:at + self.piece]
            self.pulled += len(piece)
            yield piece


# -- looking straight at the backing storage ----------------------------------


def s3_client(harness: StoreHarness) -> Any:
    return boto3.client("s3", endpoint_url=harness.storage.s3.endpoint_url,
                        region_name="us-east-1")


def fs_root(harness: StoreHarness) -> Path:
    return Path(harness.storage.filesystem.root)


def assert_nothing_stored(harness: StoreHarness) -> None:
    """No object, no session, no upload data anywhere in the backing storage."""
    if harness.kind == "filesystem":
        root = fs_root(harness)
        objects = [p for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).parts[0] != RESERVED_PREFIX]
        assert objects == []
        for sub in ("sessions", "data", "callbacks"):
            assert list((root / RESERVED_PREFIX / sub).iterdir()) == [], sub
        return
    client, bucket = s3_client(harness), harness.storage.s3.bucket
    listing = client.list_objects_v2(Bucket=bucket)
    assert listing["KeyCount"] == 0, [o["Key"] for o in listing.get("Contents", [])]
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def upload_bytes_held(harness: StoreHarness) -> int:
    """Bytes of upload data the storage holds: finished objects, data files /
    multipart parts and staged tails (session records and callbacks excluded)."""
    if harness.kind == "filesystem":
        root = fs_root(harness)
        held = 0
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            parts = path.relative_to(root).parts
            if parts[0] != RESERVED_PREFIX or parts[1] == "data":
                held += path.stat().st_size
        return held
    client, bucket = s3_client(harness), harness.storage.s3.bucket
    reserved = f"{harness.storage.s3.prefix}{RESERVED_PREFIX}/"
    held = 0
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        key = obj["Key"]
        if not key.startswith(reserved) or key.startswith(f"{reserved}staged/"):
            held += obj["Size"]
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        parts = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        held += sum(part["Size"] for part in parts.get("Parts", []))
    return held


def finished_object_exists(harness: StoreHarness, name: str) -> bool:
    if harness.kind == "filesystem":
        return (fs_root(harness) / name).exists()
    listing = s3_client(harness).list_objects_v2(
        Bucket=harness.storage.s3.bucket, Prefix=harness.storage.s3.prefix + name
    )
    return any(o["Key"] == harness.storage.s3.prefix + name for o in listing.get("Contents", []))


async def pending_callbacks(harness: StoreHarness) -> list[tuple[str, bytes]]:
    """Callbacks still owed: in the outbox, or as the intent a completed
    session record carries (the body rebuilt from the record)."""
    store = await harness.open()
    owed = await store.list_pending()  # type: ignore[attr-defined]
    async for info in store.list_completed():
        if info.notify_pending:
            owed.append((info.session_id, encode(completion_payload(info))))
    return owed


def object_key(harness: StoreHarness, name: str) -> str:
    return harness.storage.s3.prefix + name if harness.kind == "s3" else name


# -- allow ---------------------------------------------------------------------


async def test_allowed_upload_forwards_headers_and_stores_metadata(
    main, proxies, http, store_harness
) -> None:
    main.auth = lambda document: _json(
        {"metadata": {"user": "42"}, "owner": "u1"}
    )
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    data = os.urandom(MIB + 77)
    name = "allowed/clip.mp4"
    resp = await put_range(
        http, f"{proxy.url}/upload/{name}", data, 0, len(data),
        **{"Authorization": "Bearer t1", "Cookie": "sid=abc", "X-Other": "secret-ish",
           "Content-Type": "video/mp4"},
    )
    assert resp.status == 200
    async with http.put(f"{proxy.url}/upload/{name}",
                        headers={"Content-Range": "bytes */*", **T1}) as status:
        assert status.status == 200
        doc = await status.json()

    assert len(main.auth_calls) == 2
    create = main.auth_calls[0]
    assert create["action"] == "create"
    assert create["name"] == name
    assert create["key"] == object_key(store_harness, name)
    assert create["content_length"] == len(data)
    assert create["content_range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    assert create["content_type"] == "video/mp4"
    assert create["remote_addr"] == "127.0.0.1"
    # Only the configured credentials leave the proxy.
    assert create["headers"] == {"Authorization": "Bearer t1", "Cookie": "sid=abc"}
    assert main.auth_calls[1]["action"] == "status"
    assert main.auth_calls[1]["content_range"] == "bytes */*"

    assert doc["size"] == len(data)
    assert doc["metadata"] == {"user": "42"}
    assert await stored_object(store_harness, name) == data
    if store_harness.kind == "s3":
        head = s3_client(store_harness).head_object(
            Bucket=store_harness.storage.s3.bucket, Key=object_key(store_harness, name)
        )
        assert head["Metadata"]["user"] == "42"
        assert head["ContentType"] == "video/mp4"


async def _json(document: dict[str, Any], status: int = 200) -> web.StreamResponse:
    return web.json_response(document, status=status)


# -- deny ----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(401, "unauthorized"), (403, "forbidden")])
async def test_refusals_pass_through_and_store_nothing(
    main, proxies, http, store_harness, status, code
) -> None:
    main.auth = lambda document: _json({"message": "go away"}, status)
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    data = os.urandom(300 * 1024)
    requests = [
        # a plain PUT, a first chunk, an initiation, a probe, a cancel
        ("PUT", {}, data),
        ("PUT", {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}, data),
        ("POST", {"X-Upload-Content-Length": str(len(data))}, None),
        ("PUT", {"Content-Range": "bytes */*"}, None),
        ("DELETE", {}, None),
    ]
    for method, headers, body in requests:
        async with http.request(method, f"{proxy.url}/upload/denied.bin", data=body,
                                headers={**T1, **headers}, allow_redirects=False) as resp:
            assert resp.status == status, (method, headers)
            doc = await resp.json()
            assert doc == {"error": code, "message": "go away"}
    assert [c["action"] for c in main.auth_calls] == [
        "create", "create", "create", "status", "cancel"
    ]
    assert_nothing_stored(store_harness)


# -- curl and Expect: 100-continue -------------------------------------------


def run_curl(url: str, path: Path, *headers: str) -> tuple[int, int, str, float]:
    """PUT a file with the real curl; (status, bytes curl uploaded, body, seconds)."""
    body_path = path.with_suffix(".answer")
    command = [
        "curl", "-sS", "-T", str(path), "-o", str(body_path),
        "-w", "%{http_code} %{size_upload}",
        "-H", "Expect: 100-continue",
        # Wait long for the 100: a body sent now was asked for by the proxy.
        "--expect100-timeout", "20",
    ]
    for header in headers:
        command += ["-H", header]
    started = time.monotonic()
    result = subprocess.run([*command, url], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    code, uploaded = result.stdout.split()
    return int(code), int(float(uploaded)), body_path.read_text(), elapsed


@pytest.fixture(scope="module")
def curl_available() -> None:
    try:
        result = subprocess.run(["curl", "--version"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("curl is not installed")
    if result.returncode != 0:
        pytest.skip("curl --version failed")


async def test_curl_expect_continue_refused_sends_no_body_then_allowed_uploads(
    curl_available, main, proxies, store_harness, tmp_path
) -> None:
    big = tmp_path / "big.bin"
    data = os.urandom(20 * MIB)
    big.write_bytes(data)
    main.auth = lambda document: _json({"message": "no uploads for you"}, 403)
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    url = f"{proxy.url}/upload/curl/big.bin"

    status, uploaded, body, _ = await asyncio.to_thread(
        run_curl, url, big, "Authorization: Bearer t1"
    )
    assert status == 403
    assert json.loads(body) == {"error": "forbidden", "message": "no uploads for you"}
    # The proxy answered without a 100 Continue: curl never sent the body.
    assert uploaded < MIB, uploaded
    assert len(main.auth_calls) == 1
    assert main.auth_calls[0]["action"] == "create"
    assert main.auth_calls[0]["content_length"] == len(data)
    assert_nothing_stored(store_harness)

    main.auth = owner_by_token
    status, uploaded, body, elapsed = await asyncio.to_thread(
        run_curl, url, big, "Authorization: Bearer t1"
    )
    assert status == 200, body
    assert uploaded == len(data)
    # curl waits up to 20 s for the 100: it came from the proxy right after auth.
    assert elapsed < 15
    assert json.loads(body)["size"] == len(data)
    assert await stored_object(store_harness, "curl/big.bin") == data


# -- owners ---------------------------------------------------------------------


async def test_another_owner_cannot_touch_an_upload(main, proxies, http, store_harness) -> None:
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    url = f"{proxy.url}/upload/owned.bin"
    data = os.urandom(3 * MIB + 5)
    resp = await put_range(http, url, data[:MIB], 0, len(data), **T1)
    assert resp.status == 308

    resp = await put_range(http, url, data[MIB:2 * MIB], MIB, len(data), **T2)
    assert resp.status == 403
    resp = await probe_as(http, url, T2)
    assert resp.status == 403
    async with http.delete(url, headers=T2) as delete:
        assert delete.status == 403
        assert (await delete.json())["error"] == "forbidden"
    # Nor may u2 replace it with a new upload of the same name.
    async with http.put(url, data=b"mine now", headers=T2) as replace:
        assert replace.status == 403
    async with http.post(url, headers={"X-Upload-Content-Length": "8", **T2}) as initiate:
        assert initiate.status == 403

    resp = await probe_as(http, url, T1)
    assert resp.status == 308
    assert resp.headers["Range"] == f"bytes=0-{MIB - 1}"
    resp = await put_range(http, url, data[MIB:], MIB, len(data), **T1)
    assert resp.status == 200
    assert await stored_object(store_harness, "owned.bin") == data


# -- webhook unavailable: fail closed ----------------------------------------


@pytest.mark.parametrize("failure", ["slow", "down", "error500"])
async def test_unavailable_webhook_is_503(main, proxies, http, store_harness, failure) -> None:
    async def slow(document: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(1.5)
        return await owner_by_token(document)

    url = main.auth_url
    if failure == "slow":
        main.auth = slow
    elif failure == "down":
        url = f"http://127.0.0.1:{free_port()}/auth"
    else:
        main.auth = lambda document: _json({"message": "boom"}, 500)
    proxy = await proxies.start(auth=auth_config(url, timeout=0.3))

    for headers, body in (({}, os.urandom(1000)),
                          ({"Content-Range": "bytes 0-999/1000"}, os.urandom(1000)),
                          ({"Content-Range": "bytes */*"}, None)):
        started = time.monotonic()
        async with http.put(f"{proxy.url}/upload/unavailable.bin", data=body,
                            headers={**T1, **headers}, allow_redirects=False) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) > 0
            doc = await resp.json()
        assert doc["error"] == "auth_unavailable"
        assert doc["message"]
        assert time.monotonic() - started < 1.2  # the proxy gave up after auth.timeout
    if failure != "down":
        assert len(main.auth_calls) == 3
    assert_nothing_stored(store_harness)


# -- max_size from the webhook ------------------------------------------------


def allow_up_to(max_size: int) -> AuthAnswer:
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"owner": "u1", "max_size": max_size})
    return answer


async def test_declared_size_above_max_size_is_413_before_any_byte(
    main, proxies, http, store_harness
) -> None:
    limit = 2 * MIB
    main.auth = allow_up_to(limit)
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    url = f"{proxy.url}/upload/too/big.bin"
    data = os.urandom(3 * MIB)
    declared = [
        # a first chunk declaring a total above the limit
        {"Content-Range": f"bytes 0-{MIB - 1}/{len(data)}", "Content-Length": str(MIB)},
        # a plain PUT with a Content-Length above the limit
        {"Content-Length": str(len(data))},
    ]
    for headers in declared:
        length = int(headers["Content-Length"])
        body = CountingBody(data[:length])
        # expect100: the client sends the body only once the proxy says 100 Continue.
        async with http.put(url, data=body, expect100=True, headers={**T1, **headers},
                            allow_redirects=False) as resp:
            assert resp.status == 413, headers
            assert (await resp.json())["error"] == "too_large"
        assert body.pulled == 0, headers
    async with http.post(url, headers={"X-Upload-Content-Length": str(len(data)), **T1}) as resp:
        assert resp.status == 413
    assert_nothing_stored(store_harness)


async def test_first_open_range_past_max_size_is_413_and_creates_nothing(
    main, proxies, http, store_harness
) -> None:
    """``bytes 0-N/*`` with N+1 above max_size: the range alone proves the object
    too large, so the request is refused like a declared total: no body byte
    read, and no upload left behind (a probe still says 404)."""
    limit = 2 * MIB
    main.auth = allow_up_to(limit)
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    url = f"{proxy.url}/upload/too/open.bin"
    data = os.urandom(3 * MIB)
    body = CountingBody(data)
    async with http.put(url, data=body, expect100=True, allow_redirects=False, headers={
        "Content-Range": f"bytes 0-{len(data) - 1}/*", "Content-Length": str(len(data)), **T1,
    }) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"
    assert body.pulled == 0
    resp = await probe_as(http, url, T1)
    assert resp.status == 404
    assert_nothing_stored(store_harness)


async def test_unknown_total_chunks_past_max_size_are_413(
    main, proxies, http, store_harness
) -> None:
    limit = 7 * MIB + 123
    main.auth = allow_up_to(limit)
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    url = f"{proxy.url}/upload/open/ended.bin"
    data = os.urandom(8 * MIB)
    resp = await put_range(http, url, data[:4 * MIB], 0, None, **T1)
    assert resp.status == 308
    body = CountingBody(data[4 * MIB:])
    async with http.put(url, data=body, expect100=True, allow_redirects=False, headers={
        "Content-Range": f"bytes {4 * MIB}-{len(data) - 1}/*",
        "Content-Length": str(4 * MIB), **T1,
    }) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"
    assert body.pulled == 0
    resp = await probe_as(http, url, T1)
    assert resp.status == 308
    assert resp.headers["Range"] == f"bytes=0-{4 * MIB - 1}"
    # Up to the limit is still fine.
    rest = data[4 * MIB:limit]
    resp = await put_range(http, url, rest, 4 * MIB, limit, **T1)
    assert resp.status == 200
    assert await stored_object(store_harness, "open/ended.bin") == data[:limit]


async def test_chunked_plain_put_past_max_size_is_413_and_keeps_at_most_max_size(
    main, proxies, http, store_harness
) -> None:
    limit = 7 * MIB + 123
    main.auth = allow_up_to(limit)
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    url = f"{proxy.url}/upload/chunked.bin"
    data = os.urandom(9 * MIB)
    body = CountingBody(data)
    # No Content-Length: aiohttp sends Transfer-Encoding: chunked.
    async with http.put(url, data=body, headers=T1, allow_redirects=False) as resp:
        assert resp.status == 413
        doc = await resp.json()
    assert doc["error"] == "too_large"
    assert main.auth_calls[0]["content_length"] is None
    resp = await probe_as(http, url, T1)
    assert resp.status == 308
    offset = int(resp.headers["Range"].rsplit("-", 1)[1]) + 1
    assert offset <= limit
    assert not finished_object_exists(store_harness, "chunked.bin")
    held = upload_bytes_held(store_harness)
    assert held <= limit
    assert held == offset


# -- auth cache ------------------------------------------------------------------


async def upload_in_chunks(http: aiohttp.ClientSession, url: str, data: bytes,
                           headers: dict[str, str], chunk: int = MIB) -> None:
    for start in range(0, len(data), chunk):
        resp = await put_range(http, url, data[start:start + chunk], start, len(data), **headers)
        assert resp.status == (200 if start + chunk >= len(data) else 308)


async def test_cache_saves_webhook_calls_but_never_crosses_credentials(
    main, proxies, http, store_harness
) -> None:
    data = os.urandom(8 * MIB)
    uncached = await proxies.start(auth=auth_config(main.auth_url, cache_ttl=0))
    await upload_in_chunks(http, f"{uncached.url}/upload/nocache.bin", data, T1)
    calls_without_cache = len(main.auth_calls)

    cached = await proxies.start(auth=auth_config(main.auth_url, cache_ttl=60))
    url = f"{cached.url}/upload/cache.bin"
    before = len(main.auth_calls)
    for start in range(0, 4 * MIB, MIB):
        resp = await put_range(http, url, data[start:start + MIB], start, len(data), **T1)
        assert resp.status == 308
    calls = len(main.auth_calls) - before
    assert calls == 2  # one "create", one "append" for the three appends

    # Other credentials for the same action and name: asked, never served from the cache.
    resp = await put_range(http, url, data[4 * MIB:5 * MIB], 4 * MIB, len(data),
                           Authorization="Bearer stolen")
    assert resp.status == 401
    resp = await put_range(http, url, data[4 * MIB:5 * MIB], 4 * MIB, len(data), **T2)
    assert resp.status == 403  # u2's own grant, not u1's cached one
    resp = await put_range(http, url, data[4 * MIB:5 * MIB], 4 * MIB, len(data))
    assert resp.status == 401  # no credentials at all
    assert len(main.auth_calls) - before == 5
    assert [c["headers"].get("Authorization") for c in main.auth_calls[-3:]] == [
        "Bearer stolen", "Bearer t2", None
    ]

    for start in range(4 * MIB, len(data), MIB):
        resp = await put_range(http, url, data[start:start + MIB], start, len(data), **T1)
        assert resp.status == (200 if start + MIB == len(data) else 308)
    calls_with_cache = len(main.auth_calls) - before - 3
    print(f"webhook calls for 8 x 1 MiB chunks: without cache {calls_without_cache}, "
          f"with cache {calls_with_cache}")
    assert calls_without_cache == 8
    assert calls_with_cache == 2
    assert await stored_object(store_harness, "nocache.bin") == data
    assert await stored_object(store_harness, "cache.bin") == data


# -- completion callbacks ------------------------------------------------------


def check_signed(headers: CIMultiDictProxy[str], raw: bytes) -> dict[str, Any]:
    assert headers["Content-Type"] == "application/json"
    assert verify(SECRET, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], raw)
    assert not verify("wrong-secret", headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], raw)
    return json.loads(raw)


def check_payload(payload: dict[str, Any], completion: dict[str, Any], owner: str) -> None:
    assert payload["name"] == completion["name"]
    assert payload["key"] == completion["key"]
    # Clients see the S3 bucket's name, never the filesystem store's root.
    if payload["bucket"].startswith("/"):
        assert "bucket" not in completion
    else:
        assert payload["bucket"] == completion["bucket"]
    assert payload["size"] == completion["size"]
    assert payload["content_type"] == completion["contentType"]
    assert payload["etag"] == completion["etag"]
    assert payload["crc32c"] == completion["crc32c"]
    assert payload["metadata"] == completion["metadata"] == {"user": "42"}
    assert payload["owner"] == owner
    assert abs(payload["completed_at"] - time.time()) < 120


async def test_completion_callback_is_signed_and_complete(
    main, proxies, http, store_harness
) -> None:
    proxy = await proxies.start(auth=auth_config(main.auth_url),
                                callbacks=callbacks_config(main.callback_url))
    data = os.urandom(2 * MIB + 3)
    url = f"{proxy.url}/upload/done/video.mp4"
    resp = await put_range(http, url, data[:MIB], 0, len(data), **T1)
    assert resp.status == 308
    async with http.put(url, data=data[MIB:], headers={
        "Content-Range": f"bytes {MIB}-{len(data) - 1}/{len(data)}",
        "Content-Type": "video/mp4", **T2,
    }) as resp:
        assert resp.status == 403  # not u2's upload
    async with http.put(url, data=data[MIB:], headers={
        "Content-Range": f"bytes {MIB}-{len(data) - 1}/{len(data)}", **T1,
    }) as resp:
        assert resp.status == 200
        completion = await resp.json()

    await eventually(lambda: main.answered == [200])
    assert len(main.callbacks) == 1
    headers, raw = main.callbacks[0]
    assert len(headers[CALLBACK_ID_HEADER]) == 32
    payload = check_signed(headers, raw)
    check_payload(payload, completion, owner="u1")
    assert payload["key"] == object_key(store_harness, "done/video.mp4")
    assert set(payload) == {"name", "key", "bucket", "size", "content_type", "etag",
                            "crc32c", "metadata", "owner", "completed_at"}
    assert await pending_callbacks(store_harness) == []


async def test_upload_answer_does_not_wait_for_a_blocked_receiver(
    main, proxies, http, store_harness
) -> None:
    main.gate = asyncio.Event()
    proxy = await proxies.start(auth=auth_config(main.auth_url),
                                callbacks=callbacks_config(main.callback_url))
    data = os.urandom(MIB)
    started = time.monotonic()
    async with asyncio.timeout(5):
        resp = await put_range(http, f"{proxy.url}/upload/quick.bin", data, 0, len(data), **T1)
    assert resp.status == 200
    assert time.monotonic() - started < 5
    await asyncio.wait_for(main.callback_arrived.wait(), 5)
    # The receiver holds the callback unanswered, yet the client has its 200.
    assert main.answered == []
    # Until delivered, the callback stays in the outbox.
    assert len(await pending_callbacks(store_harness)) == 1
    main.gate.set()
    await eventually(lambda: main.answered == [200])
    await eventually_async(lambda: _no_pending(store_harness))


async def _no_pending(harness: StoreHarness) -> bool:
    return await pending_callbacks(harness) == []


async def eventually_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def test_callback_retried_until_the_receiver_recovers(
    main, proxies, http, store_harness
) -> None:
    main.callback_statuses = [500, 500]
    proxy = await proxies.start(auth=auth_config(main.auth_url),
                                callbacks=callbacks_config(main.callback_url))
    data = os.urandom(1000)
    async with http.put(f"{proxy.url}/upload/retry.bin", data=data, headers=T1) as resp:
        assert resp.status == 200
        completion = await resp.json()
    await eventually(lambda: len(main.answered) == 3)
    await eventually_async(lambda: _no_pending(store_harness))
    # Stopping the proxy lets in-flight deliveries finish and ends all of them:
    # whatever it would still have attempted after the 2xx has happened by now.
    await proxy.stop()
    assert main.answered == [500, 500, 200]
    ids = {headers[CALLBACK_ID_HEADER] for headers, _ in main.callbacks}
    assert len(ids) == 1
    for headers, raw in main.callbacks:
        check_payload(check_signed(headers, raw), completion, owner="u1")


async def test_pending_callback_delivered_after_restart(
    main, proxies, http, store_harness
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/callback"
    first = await proxies.start(auth=auth_config(main.auth_url),
                                callbacks=callbacks_config(unreachable, max_attempts=2))
    data = os.urandom(MIB + 1)
    resp = await put_range(http, f"{first.url}/upload/later.bin", data, 0, len(data), **T1)
    assert resp.status == 200
    async with http.put(f"{first.url}/upload/later.bin",
                        headers={"Content-Range": "bytes */*", **T1}) as status:
        completion = await status.json()
    await first.stop()  # the "crash": nothing was delivered
    pending = await pending_callbacks(store_harness)
    assert len(pending) == 1
    callback_id, stored_body = pending[0]
    assert main.callbacks == []

    await proxies.start(auth=auth_config(main.auth_url),
                        callbacks=callbacks_config(main.callback_url))
    await eventually(lambda: main.answered == [200])
    headers, raw = main.callbacks[0]
    assert headers[CALLBACK_ID_HEADER] == callback_id
    assert raw == stored_body
    check_payload(check_signed(headers, raw), completion, owner="u1")
    await eventually_async(lambda: _no_pending(store_harness))
    assert await stored_object(store_harness, "later.bin") == data
