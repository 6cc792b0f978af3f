"""End-to-end protocol tests: the real app on a real port, against every store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import google_crc32c
import pytest
import yarl

from app.http import keys
from tests.http_support import (
    ProxyFactory,
    cut_upload,
    raw_request,
    wait_until_server_read_all,
)
from tests.stores.fixtures import StoreHarness

MIB = 1024 * 1024


@pytest.fixture
async def proxies(store_harness: StoreHarness) -> AsyncIterator[ProxyFactory]:
    factory = ProxyFactory(store_harness.config)
    yield factory
    await factory.stop_all()


def crc_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


async def stored_object(harness: StoreHarness, name: str) -> bytes:
    """The finished object's bytes, read straight from the backing storage."""
    storage = harness.storage
    if harness.kind == "filesystem":
        with open(os.path.join(storage.filesystem.root, name), "rb") as fh:
            return fh.read()
    import boto3

    client = boto3.client("s3", endpoint_url=storage.s3.endpoint_url, region_name="us-east-1")
    return client.get_object(Bucket=storage.s3.bucket, Key=storage.s3.prefix + name)["Body"].read()


async def wait_idle(proxy_app, name: str | None = None, timeout: float = 10) -> None:
    """Wait until the server has finished with every writer (it has processed
    a disconnect and persisted what arrived)."""
    writers = proxy_app[keys.WRITERS]
    async with asyncio.timeout(timeout):
        while writers.active:
            await asyncio.sleep(0.02)


async def probe(http: aiohttp.ClientSession, url: str, total: str = "*") -> aiohttp.ClientResponse:
    async with http.put(url, headers={"Content-Range": f"bytes */{total}"},
                        allow_redirects=False) as resp:
        await resp.read()
        return resp


async def put_range(http: aiohttp.ClientSession, url: str, data: bytes, start: int,
                    total: int | None, **headers: str) -> aiohttp.ClientResponse:
    end = start + len(data) - 1
    total_text = "*" if total is None else str(total)
    async with http.put(
        url, data=data, allow_redirects=False,
        headers={"Content-Range": f"bytes {start}-{end}/{total_text}", **headers},
    ) as resp:
        await resp.read()
        return resp


async def test_plain_put_20mib(proxies, http, store_harness) -> None:
    proxy = await proxies.start(storage={"md5": True})
    data = os.urandom(20 * MIB)
    async with http.put(f"{proxy.url}/upload/videos/a.mp4", data=data,
                        headers={"Content-Type": "video/mp4"}) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    assert doc["name"] == "videos/a.mp4"
    assert doc["size"] == len(data)
    assert doc["contentType"] == "video/mp4"
    assert doc["crc32c"] == crc_b64(data)
    assert doc["md5Hash"] == md5_b64(data)
    assert doc["etag"]
    assert await stored_object(store_harness, "videos/a.mp4") == data
    # Repeat probes of a completed upload answer the same JSON.
    async with http.put(f"{proxy.url}/upload/videos/a.mp4",
                        headers={"Content-Range": "bytes */*"}) as resp:
        assert resp.status == 200
        assert await resp.json() == doc


async def test_cut_mid_body_keeps_exactly_what_arrived(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(20 * MIB)
    sent = 13 * MIB
    await cut_upload(proxy.port, "cut.bin", data[:sent], declared=len(data))
    await wait_idle(proxy.app)
    resp = await probe(http, f"{proxy.url}/upload/cut.bin")
    assert resp.status == 308
    assert resp.headers["Range"] == f"bytes=0-{sent - 1}"
    assert "Location" not in resp.headers
    resp = await put_range(http, f"{proxy.url}/upload/cut.bin", data[sent:], sent, len(data))
    assert resp.status == 200
    assert await stored_object(store_harness, "cut.bin") == data


async def test_small_chunks_grow_the_range(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(8 * MIB + 12345)
    url = f"{proxy.url}/upload/small/chunks.bin"
    offset = 0
    while offset < len(data):
        piece = data[offset:offset + MIB]
        end = offset + len(piece) - 1
        async with http.put(url, data=piece, allow_redirects=False,
                            headers={"Content-Range": f"bytes {offset}-{end}/{len(data)}"}
                            ) as resp:
            offset += len(piece)
            if offset < len(data):
                assert resp.status == 308
                assert resp.headers["Range"] == f"bytes=0-{offset - 1}"
            else:
                assert resp.status == 200
                assert (await resp.json())["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, "small/chunks.bin") == data


async def test_overlap_is_skipped_and_gap_is_409(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/overlap.bin"
    data = os.urandom(3 * MIB)
    resp = await put_range(http, url, data[:MIB], 0, len(data))
    assert resp.status == 308
    # Resend the first chunk plus some new bytes: the old ones are skipped.
    resp = await put_range(http, url, data[: MIB + 1000], 0, len(data))
    assert resp.status == 308
    assert resp.headers["Range"] == f"bytes=0-{MIB + 999}"
    # A gap: nothing written, 409 with the true Range and a JSON error.
    async with http.put(url, data=data[2 * MIB:], allow_redirects=False,
                        headers={"Content-Range": f"bytes {2 * MIB}-{len(data) - 1}/{len(data)}"}
                        ) as resp:
        assert resp.status == 409
        assert resp.headers["Range"] == f"bytes=0-{MIB + 999}"
        doc = await resp.json()
        assert doc["error"] == "offset_mismatch"
        assert doc["expected_offset"] == MIB + 1000
    resp = await probe(http, url)
    assert resp.headers["Range"] == f"bytes=0-{MIB + 999}"
    resp = await put_range(http, url, data[500:], 500, len(data))
    assert resp.status == 200
    assert await stored_object(store_harness, "overlap.bin") == data


async def test_unknown_name_delete_and_zero_byte(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    resp = await probe(http, f"{proxy.url}/upload/never.bin")
    assert resp.status == 404
    resp = await put_range(http, f"{proxy.url}/upload/never.bin", b"abc", 10, None)
    assert resp.status == 404
    resp = await put_range(http, f"{proxy.url}/upload/gone.bin", b"abc", 0, 10)
    assert resp.status == 308
    async with http.delete(f"{proxy.url}/upload/gone.bin") as resp:
        assert resp.status == 204
    assert (await probe(http, f"{proxy.url}/upload/gone.bin")).status == 404
    async with http.delete(f"{proxy.url}/upload/gone.bin") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    async with http.put(f"{proxy.url}/upload/empty.txt", data=b"") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["size"] == 0
    assert doc["crc32c"] == crc_b64(b"")
    assert await stored_object(store_harness, "empty.txt") == b""


async def test_unknown_total_then_final_chunk(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/stream.bin"
    data = os.urandom(7 * MIB + 3)
    resp = await put_range(http, url, data[: 4 * MIB], 0, None)
    assert resp.status == 308
    assert resp.headers["Range"] == f"bytes=0-{4 * MIB - 1}"
    resp = await put_range(http, url, data[4 * MIB:], 4 * MIB, len(data))
    assert resp.status == 200
    assert await stored_object(store_harness, "stream.bin") == data


async def test_probe_with_total_finalizes(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/finalize.bin"
    data = os.urandom(MIB + 7)
    resp = await put_range(http, url, data, 0, None)
    assert resp.status == 308
    resp = await probe(http, url, str(len(data) + 1))
    assert resp.status == 308
    resp = await probe(http, url, str(len(data)))
    assert resp.status == 200
    assert await stored_object(store_harness, "finalize.bin") == data


async def test_total_contradiction_is_400(proxies, http) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/total.bin"
    assert (await put_range(http, url, b"x" * 10, 0, 100)).status == 308
    resp = await put_range(http, url, b"y" * 10, 10, 200)
    assert resp.status == 400
    assert (await probe(http, url, "50")).status == 400
    resp = await probe(http, url)
    assert resp.headers["Range"] == "bytes=0-9"


async def test_restart_between_chunks(proxies, http, store_harness) -> None:
    first = await proxies.start()
    data = os.urandom(9 * MIB + 1)
    resp = await put_range(http, f"{first.url}/upload/restart.bin", data[: 7 * MIB], 0, len(data))
    assert resp.status == 308
    await first.stop()
    second = await proxies.start()
    resp = await probe(http, f"{second.url}/upload/restart.bin")
    assert resp.headers["Range"] == f"bytes=0-{7 * MIB - 1}"
    resp = await put_range(http, f"{second.url}/upload/restart.bin", data[7 * MIB:], 7 * MIB,
                           len(data))
    assert resp.status == 200
    assert (await resp.json())["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, "restart.bin") == data


async def test_second_process_continues_the_upload(proxies, http, store_harness) -> None:
    one, two = await proxies.start(), await proxies.start()
    data = os.urandom(6 * MIB + 100)
    resp = await put_range(http, f"{one.url}/upload/shared.bin", data[:MIB], 0, None)
    assert resp.status == 308
    resp = await put_range(http, f"{two.url}/upload/shared.bin", data[MIB:], MIB, len(data))
    assert resp.status == 200
    assert (await resp.json())["crc32c"] == crc_b64(data)
    resp = await probe(http, f"{one.url}/upload/shared.bin")
    assert resp.status == 200
    assert await stored_object(store_harness, "shared.bin") == data


async def test_new_request_takes_over_a_stalled_writer(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(10 * MIB)
    sent = 3 * MIB + 17
    head = (f"PUT /upload/stalled.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"Content-Range: bytes 0-{len(data) - 1}/{len(data)}")
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        # A half-open mobile connection: bytes sent, then silence, socket kept open.
        await loop.run_in_executor(None, sock.sendall, head.encode() + b"\r\n\r\n" + data[:sent])
        await wait_until_server_read_all(sock)
        started = loop.time()
        resp = await probe(http, f"{proxy.url}/upload/stalled.bin")
        assert loop.time() - started < proxy.config.storage.takeover_timeout
        assert resp.status == 308
        assert resp.headers["Range"] == f"bytes=0-{sent - 1}"
        assert proxy.app[keys.WRITERS].takeovers == 1
        resp = await put_range(http, f"{proxy.url}/upload/stalled.bin", data[sent:], sent,
                               len(data))
        assert resp.status == 200
    finally:
        sock.close()
    assert await stored_object(store_harness, "stalled.bin") == data


async def test_concurrent_puts_same_name(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(4 * MIB)
    url = f"{proxy.url}/upload/race.bin"
    results = await asyncio.gather(
        put_range(http, url, data, 0, len(data)), put_range(http, url, data, 0, len(data))
    )
    assert 200 in [r.status for r in results]
    resp = await probe(http, url)
    assert resp.status == 200
    assert await stored_object(store_harness, "race.bin") == data


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"Content-Range": "bytes 0-9/5"}, "invalid_content_range"),
        ({"Content-Range": "bytes=0-9/10"}, "invalid_content_range"),
        ({"Content-Range": "bytes 9-0/10"}, "invalid_content_range"),
        ({"Content-Range": "items 0-9/10"}, "invalid_content_range"),
        ({"Content-Range": "bytes 0-9/10", "x-goog-hash": "crc32c=***"}, "bad_request"),
    ],
)
async def test_malformed_requests_get_json_400(proxies, http, headers, error) -> None:
    proxy = await proxies.start()
    async with http.put(f"{proxy.url}/upload/bad.bin", data=b"0123456789",
                        headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == error


async def test_length_mismatch_is_400(proxies) -> None:
    proxy = await proxies.start()
    head = ("PUT /upload/len.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Content-Range: bytes 0-9/10\r\nConnection: close")
    answer = await asyncio.to_thread(raw_request, proxy.port, head, b"01234",
                                     close_after_body=False)
    assert answer.startswith(b"HTTP/1.1 400")
    assert b'"length_mismatch"' in answer


@pytest.mark.parametrize("path", ["%2e%2e/x", "a/%2e%2e/b", "%00x", ".uploads/x", "a//b",
                                  "x" * 1100, "%2Fabs"])
async def test_bad_names_are_400(proxies, http, path) -> None:
    proxy = await proxies.start()
    async with http.put(yarl.URL(f"{proxy.url}/upload/{path}", encoded=True), data=b"x") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_name"


async def test_digest_mismatch_refuses_completion(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(1000)
    wrong = crc_b64(data + b"!")
    resp = await put_range(http, f"{proxy.url}/upload/digest.bin", data, 0, len(data),
                           **{"x-goog-hash": f"crc32c={wrong}"})
    assert resp.status == 400
    assert (await probe(http, f"{proxy.url}/upload/digest.bin")).status == 404
    # Right crc32c, wrong md5: the md5 is computed because the client sent one.
    resp = await put_range(http, f"{proxy.url}/upload/digest.bin", data, 0, len(data),
                           **{"x-goog-hash": f"crc32c={crc_b64(data)},md5={md5_b64(b'x')}"})
    assert resp.status == 400
    assert (await probe(http, f"{proxy.url}/upload/digest.bin")).status == 404
    async with http.put(f"{proxy.url}/upload/digest.bin", data=data, headers={
            "x-goog-hash": f"crc32c={crc_b64(data)},md5={md5_b64(data)}"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["md5Hash"] == md5_b64(data)
    assert await stored_object(store_harness, "digest.bin") == data


async def test_post_initiation_gives_absolute_location(proxies, http) -> None:
    proxy = await proxies.start()
    async with http.post(f"{proxy.url}/upload/init%20me.bin",
                         headers={"X-Upload-Content-Length": "10",
                                  "X-Upload-Content-Type": "text/plain"},
                         json={"metadata": {"a": "b"}}) as resp:
        assert resp.status == 200
        location = resp.headers["Location"]
    assert location == f"{proxy.url}/upload/init%20me.bin"
    resp = await put_range(http, location, b"0123456789", 0, 10)
    assert resp.status == 200
    async with http.put(location, headers={"Content-Range": "bytes */*"}) as resp:
        doc = await resp.json()
    assert doc["contentType"] == "text/plain"
    assert doc["metadata"] == {"a": "b"}
    assert doc["name"] == "init me.bin"


async def test_unknown_route_is_json_404(proxies, http) -> None:
    proxy = await proxies.start()
    async with http.get(f"{proxy.url}/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"


@pytest.mark.parametrize("store_kind", ["s3"])
async def test_s3_down_mid_upload_is_503_then_resumes(proxies, http, store_harness, relay) -> None:
    proxy = await proxies.start(storage={"s3": {"endpoint_url": relay.url, "max_attempts": 1,
                                                "connect_timeout": 1, "read_timeout": 5}})
    url = f"{proxy.url}/upload/outage.bin"
    data = os.urandom(20 * MIB)
    resp = await put_range(http, url, data[: 7 * MIB], 0, len(data))
    assert resp.status == 308
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for start in range(7 * MIB, len(data), 256 * 1024):
            if sent >= 7 * MIB:
                relay.stop()  # S3 vanishes with the upload in full flow
            yield data[start:start + 256 * 1024]
            sent += 256 * 1024
            await asyncio.sleep(0.005)

    async with http.put(url, data=body(), allow_redirects=False,
                        headers={"Content-Range": f"bytes {7 * MIB}-{len(data) - 1}/{len(data)}"}
                        ) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert (await resp.json())["error"] == "storage_unavailable"
    resp = await probe(http, url)
    assert resp.status == 503
    relay.start()
    resp = await probe(http, url)
    assert resp.status == 308
    offset = int(resp.headers["Range"].rsplit("-", 1)[1]) + 1
    assert 7 * MIB <= offset <= 14 * MIB
    resp = await put_range(http, url, data[offset:], offset, len(data))
    assert resp.status == 200
    assert (await resp.json())["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, "outage.bin") == data


class EngineClock:
    """The engine's clock, stopped at ``at`` (the real clock while None)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> float:
        return time.time() if self.at is None else self.at


async def test_idle_upload_expires_after_upload_ttl(proxies, http, store_harness) -> None:
    # A clock the test moves, so "idle for 1.3 s" never depends on the machine's speed.
    clock = EngineClock()
    proxy = await proxies.start(clock=clock, storage={"upload_ttl": "1s"})
    url = f"{proxy.url}/upload/idle.bin"
    clock.at = time.time()  # never later than the upload's last update below
    assert (await put_range(http, url, b"a" * 100, 0, 1000)).status == 308
    assert (await probe(http, url)).headers["Range"] == "bytes=0-99"
    clock.at = time.time() + 1.3  # 1.3 s after the last update, at least
    assert (await probe(http, url)).status == 404
    assert (await put_range(http, url, b"b" * 100, 100, 1000)).status == 404
    # Starting again from byte 0 is a new upload.
    resp = await put_range(http, url, b"c" * 1000, 0, 1000)
    assert resp.status == 200
    assert await stored_object(store_harness, "idle.bin") == b"c" * 1000
    # A completed upload does not expire: repeat requests still get its JSON.
    clock.at = time.time() + 1.3
    assert (await probe(http, url)).status == 200
