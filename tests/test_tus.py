"""tus 1.0 on the wire: the real app on a real port, both stores, raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import zlib
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime

import aiohttp
import google_crc32c
import pytest

from app.core.protocol import id_session_name
from app.http import keys
from tests.http_support import Proxy, raw_request
from tests.test_http import proxies, stored_object  # noqa: F401

MIB = 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {**TUS, "Content-Type": "application/offset+octet-stream"}


def meta(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def create(http: aiohttp.ClientSession, proxy: Proxy, length: int | None, *,
                 status: int = 201, **headers: str) -> str:
    sent = {**TUS, **headers}
    if length is not None:
        sent["Upload-Length"] = str(length)
    async with http.post(f"{proxy.url}/files/", headers=sent) as resp:
        assert resp.status == status, await resp.text()
        return resp.headers.get("Location", "")


async def patch(http: aiohttp.ClientSession, url: str, data: bytes, offset: int,
                **headers: str) -> aiohttp.ClientResponse:
    async with http.patch(url, data=data,
                          headers={**OCTETS, "Upload-Offset": str(offset), **headers}) as resp:
        await resp.read()
        return resp


async def head(http: aiohttp.ClientSession, url: str, **headers: str) -> aiohttp.ClientResponse:
    async with http.head(url, headers={**TUS, **headers}) as resp:
        return resp


def session_of(url: str) -> str:
    return id_session_name("tus", url.rsplit("/", 1)[1])


async def test_options_discovery(proxies, http) -> None:  # noqa: F811
    proxy = await proxies.start()
    async with http.options(f"{proxy.url}/files/") as resp:
        assert resp.status == 204
        assert resp.headers["Tus-Version"] == "1.0.0"
        extensions = set(resp.headers["Tus-Extension"].split(","))
        assert extensions == {"creation", "creation-with-upload", "creation-defer-length",
                              "termination", "expiration", "checksum", "concatenation"}
        assert {"sha1", "md5", "crc32", "crc32c"} <= set(
            resp.headers["Tus-Checksum-Algorithm"].split(","))
        assert int(resp.headers["Tus-Max-Size"]) > 0


async def test_create_patch_head_in_pieces(proxies, http, store_harness) -> None:  # noqa: F811
    proxy = await proxies.start()
    data = os.urandom(3 * MIB + 17)
    url = await create(http, proxy, len(data),
                       **{"Upload-Metadata": meta(filename="a/b.bin", filetype="video/mp4")})
    assert url.startswith(f"{proxy.url}/files/") and len(url.rsplit("/", 1)[1]) >= 22
    resp = await head(http, url)
    assert resp.status == 200
    assert resp.headers["Upload-Offset"] == "0"
    assert resp.headers["Upload-Length"] == str(len(data))
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Upload-Metadata"] == meta(filename="a/b.bin", filetype="video/mp4")
    expires = parsedate_to_datetime(resp.headers["Upload-Expires"])
    assert expires.tzinfo is not None
    first = await patch(http, url, data[:MIB], 0)
    assert first.status == 204 and first.headers["Upload-Offset"] == str(MIB)
    assert first.headers["Tus-Resumable"] == "1.0.0"
    last = await patch(http, url, data[MIB:], MIB)
    assert last.status == 204 and last.headers["Upload-Offset"] == str(len(data))
    assert await stored_object(store_harness, "tus/a/b.bin") == data
    done = await head(http, url)
    assert done.headers["Upload-Offset"] == str(len(data))
    assert "Upload-Expires" not in done.headers


async def test_version_type_and_header_errors(proxies, http) -> None:  # noqa: F811
    proxy = await proxies.start()
    async with http.post(f"{proxy.url}/files/", headers={"Upload-Length": "5"}) as resp:
        assert resp.status == 412 and resp.headers["Tus-Version"] == "1.0.0"
    async with http.post(f"{proxy.url}/files/",
                         headers={"Tus-Resumable": "0.2.2", "Upload-Length": "5"}) as resp:
        assert resp.status == 412
    await create(http, proxy, None, status=400)  # neither length nor defer
    await create(http, proxy, 5, status=400, **{"Upload-Defer-Length": "1"})
    await create(http, proxy, None, status=400, **{"Upload-Length": "-1"})
    await create(http, proxy, 5, status=400, **{"Upload-Metadata": "name not*base64"})
    await create(http, proxy, 5, status=400, **{"Upload-Metadata": meta(name="../x")})
    url = await create(http, proxy, 5)
    async with http.patch(url, data=b"hello", headers={**TUS, "Upload-Offset": "0",
                                                       "Content-Type": "text/plain"}) as resp:
        assert resp.status == 415
        assert resp.headers["Tus-Resumable"] == "1.0.0"
    bad = await patch(http, url, b"hello", 0, **{"Upload-Checksum": "whirlpool AAAA"})
    assert bad.status == 400
    assert (await head(http, f"{proxy.url}/files/nosuchuploadidatall")).status == 404
    assert (await head(http, f"{proxy.url}/files/x")).status == 404


async def test_wrong_offset_is_409_and_stores_nothing(proxies, http) -> None:  # noqa: F811
    proxy = await proxies.start()
    url = await create(http, proxy, 10)
    assert (await patch(http, url, b"abcd", 0)).status == 204
    for wrong in (0, 2, 6):
        resp = await patch(http, url, b"efgh", wrong)
        assert resp.status == 409
        assert resp.headers["Upload-Offset"] == "4"
    assert (await head(http, url)).headers["Upload-Offset"] == "4"
    store = proxy.app[keys.STORE]
    assert (await store.get(session_of(url))).offset == 4


@pytest.mark.parametrize(("algorithm", "digest"), [
    ("sha1", lambda d: hashlib.sha1(d).digest()),
    ("md5", lambda d: hashlib.md5(d).digest()),
    ("crc32", lambda d: zlib.crc32(d).to_bytes(4, "big")),
    ("crc32c", lambda d: google_crc32c.value(d).to_bytes(4, "big")),
])
async def test_checksum_match_and_mismatch(proxies, http, store_harness,  # noqa: F811
                                           algorithm, digest) -> None:
    proxy = await proxies.start()
    data = os.urandom(300_000)
    url = await create(http, proxy, len(data), **{"Upload-Metadata": meta(name="sum.bin")})
    good = base64.b64encode(digest(data[:100_000])).decode()
    ok = await patch(http, url, data[:100_000], 0, **{"Upload-Checksum": f"{algorithm} {good}"})
    assert ok.status == 204 and ok.headers["Upload-Offset"] == "100000"
    wrong = base64.b64encode(digest(b"something else")).decode()
    bad = await patch(http, url, data[100_000:], 100_000,
                      **{"Upload-Checksum": f"{algorithm} {wrong}"})
    assert bad.status == 460
    assert bad.headers["Tus-Resumable"] == "1.0.0"
    assert (await head(http, url)).headers["Upload-Offset"] == "100000"
    rest = base64.b64encode(digest(data[100_000:])).decode()
    ok = await patch(http, url, data[100_000:], 100_000,
                     **{"Upload-Checksum": f"{algorithm} {rest}"})
    assert ok.headers["Upload-Offset"] == str(len(data))
    assert await stored_object(store_harness, "tus/sum.bin") == data


async def test_cut_patch_keeps_what_arrived(proxies, http, store_harness) -> None:  # noqa: F811
    proxy = await proxies.start()
    data = os.urandom(2 * MIB)
    url = await create(http, proxy, len(data), **{"Upload-Metadata": meta(name="cut.bin")})
    path = "/" + url.split("/", 3)[3]
    sent = 700_001
    head_lines = (f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                  f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                  f"Content-Length: {len(data)}")
    await asyncio.to_thread(raw_request, proxy.port, head_lines, data[:sent])
    store = proxy.app[keys.STORE]
    async with asyncio.timeout(20):  # the server reads to the cut, then persists
        while (await store.get(session_of(url))).offset < sent:
            await asyncio.sleep(0.05)
    resp = await head(http, url)
    assert resp.headers["Upload-Offset"] == str(sent)
    assert (await patch(http, url, data[sent:], sent)).status == 204
    assert await stored_object(store_harness, "tus/cut.bin") == data


async def test_defer_length_and_creation_with_upload(proxies, http, store_harness) -> None:  # noqa: F811
    proxy = await proxies.start()
    data = os.urandom(MIB + 5)
    headers = {**OCTETS, "Upload-Defer-Length": "1", "Upload-Metadata": meta(name="d.bin")}
    async with http.post(f"{proxy.url}/files/", data=data[:1000], headers=headers) as resp:
        assert resp.status == 201
        assert resp.headers["Upload-Offset"] == "1000"
        url = resp.headers["Location"]
    state = await head(http, url)
    assert state.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in state.headers
    resp = await patch(http, url, data[1000:], 1000, **{"Upload-Length": str(len(data))})
    assert resp.status == 204 and resp.headers["Upload-Offset"] == str(len(data))
    assert (await head(http, url)).headers["Upload-Length"] == str(len(data))
    assert await stored_object(store_harness, "tus/d.bin") == data


async def test_empty_upload_and_method_override(proxies, http, store_harness) -> None:  # noqa: F811
    proxy = await proxies.start()
    await create(http, proxy, 0, **{"Upload-Metadata": meta(name="empty")})
    assert await stored_object(store_harness, "tus/empty") == b""
    url = await create(http, proxy, 3, **{"Upload-Metadata": meta(name="o.bin")})
    async with http.post(url, data=b"xyz", headers={**OCTETS, "Upload-Offset": "0",
                                                   "X-HTTP-Method-Override": "PATCH"}) as resp:
        assert resp.status == 204 and resp.headers["Upload-Offset"] == "3"
    assert await stored_object(store_harness, "tus/o.bin") == b"xyz"
    other = await create(http, proxy, 3)
    async with http.post(other, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}) as resp:
        assert resp.status == 204
    assert (await head(http, other)).status == 404


async def test_termination(proxies, http) -> None:  # noqa: F811
    proxy = await proxies.start()
    url = await create(http, proxy, 10)
    assert (await patch(http, url, b"12345", 0)).status == 204
    async with http.delete(url, headers=TUS) as resp:
        assert resp.status == 204
    assert (await head(http, url)).status == 404
    assert (await patch(http, url, b"67890", 5)).status == 404


async def test_expired_upload_is_410(proxies, http, store_harness) -> None:  # noqa: F811
    proxy = await proxies.start()
    url = await create(http, proxy, 10)
    assert (await patch(http, url, b"12345", 0)).status == 204
    # Another process configured with a 1 s TTL sees the same upload expired
    # once its clock has passed that: the engine's clock, not a sleep race.
    engine = proxy.app[keys.ENGINE]
    info = await proxy.app[keys.STORE].get(session_of(url))
    engine._clock = lambda: info.updated_at + store_harness.storage.upload_ttl + 1
    resp = await head(http, url)
    assert resp.status == 410
    assert (await patch(http, url, b"67890", 5)).status == 410


async def test_webhook_name_wins(proxies, http, store_harness) -> None:  # noqa: F811
    from app.core.grant import Grant

    class Naming:
        async def authorize(self, request):
            return Grant(name=f"chosen/{request.action}.bin")

    proxy = await proxies.start(authorizer=Naming())
    url = await create(http, proxy, 4, **{"Upload-Metadata": meta(name="ignored")})
    assert (await patch(http, url, b"data", 0)).status == 204
    assert await stored_object(store_harness, "chosen/create.bin") == b"data"


@pytest.mark.parametrize("sizes", [(MIB + 3, 5, 2 * MIB), (5 * MIB + 1, 5 * MIB, 100)],
                         ids=["small", "large"])
async def test_concatenation(proxies, http, store_harness, sizes,  # noqa: F811
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    proxy = await proxies.start()
    pieces = [os.urandom(n) for n in sizes]
    urls = []
    for piece in pieces:
        url = await create(http, proxy, len(piece), **{"Upload-Concat": "partial"})
        assert (await head(http, url)).headers["Upload-Concat"] == "partial"
        assert (await patch(http, url, piece, 0)).status == 204
        urls.append(url)
    # Relative URLs are accepted as well as absolute ones.
    joined = " ".join([urls[0], "/files/" + urls[1].rsplit("/", 1)[1], urls[2]])
    headers = {**TUS, "Upload-Concat": f"final;{joined}",
               "Upload-Metadata": meta(name="joined.bin")}
    async with http.post(f"{proxy.url}/files/", headers=headers) as resp:
        assert resp.status == 201, await resp.text()
        final = resp.headers["Location"]
    state = await head(http, final)
    total = sum(map(len, pieces))
    assert state.headers["Upload-Offset"] == state.headers["Upload-Length"] == str(total)
    assert state.headers["Upload-Concat"] == "final;" + " ".join(urls)
    assert (await patch(http, final, b"x", total)).status == 403
    assert await stored_object(store_harness, "tus/joined.bin") == b"".join(pieces)
    info = await proxy.app[keys.STORE].get(session_of(final))
    assert info.completed is not None
    assert info.completed.crc32c == google_crc32c.value(b"".join(pieces))
    # Joined in the store (no byte through the service) wherever it can:
    # always on the filesystem, on S3 when every partial but the last has 5 MiB.
    in_store = store_harness.kind == "filesystem" or min(sizes[:-1]) >= 5 * MIB
    messages = [r.getMessage() for r in caplog.records]
    assert any("joined in the store" in m for m in messages) is in_store
    assert any("streaming them" in m for m in messages) is not in_store


async def test_concatenation_refuses_unfinished_or_foreign(proxies, http) -> None:  # noqa: F811
    proxy = await proxies.start()
    partial = await create(http, proxy, 10, **{"Upload-Concat": "partial"})
    plain = await create(http, proxy, 1)
    await patch(http, plain, b"x", 0)
    missing = f"{proxy.url}/files/nosuchidnosuchid"
    for urls in (partial, plain, "http://elsewhere/other/abc", missing):
        headers = {**TUS, "Upload-Concat": f"final;{urls}"}
        async with http.post(f"{proxy.url}/files/", headers=headers) as resp:
            assert resp.status in (400, 404), urls
    headers = {**TUS, "Upload-Concat": f"final;{partial}", "Upload-Length": "10"}
    async with http.post(f"{proxy.url}/files/", headers=headers) as resp:
        assert resp.status == 400


async def test_cleanup_job_expires_idle_tus_uploads(proxies, http, store_harness) -> None:  # noqa: F811
    from app.ops.cleanup import run_cleanup

    proxy = await proxies.start()
    idle = await create(http, proxy, 10)
    assert (await patch(http, idle, b"12345", 0)).status == 204
    done = await create(http, proxy, 2, **{"Upload-Metadata": meta(name="kept.bin")})
    assert (await patch(http, done, b"ok", 0)).status == 204
    store = proxy.app[keys.STORE]
    info = await store.get(session_of(idle))
    ttl = store_harness.storage.upload_ttl
    report = await run_cleanup(store, older_than=ttl, now=info.updated_at + ttl + 60)
    assert report.aborted == 1 and report.bytes_freed == 5
    assert (await head(http, idle)).status == 404
    # The finished upload's object stays; only its session record is forgotten.
    assert await stored_object(store_harness, "tus/kept.bin") == b"ok"


async def test_chunked_patch_and_length_rules(proxies, http, store_harness) -> None:  # noqa: F811
    proxy = await proxies.start()
    data = os.urandom(3 * MIB)
    url = await create(http, proxy, None, **{"Upload-Defer-Length": "1",
                                             "Upload-Metadata": meta(name="chunked.bin")})

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, 2 * MIB, 256 * 1024):
            yield data[i:i + 256 * 1024]

    # No Content-Length: chunked transfer-encoding, as streaming clients send.
    async with http.patch(url, data=pieces(), headers={**OCTETS, "Upload-Offset": "0"}) as resp:
        assert resp.status == 204 and resp.headers["Upload-Offset"] == str(2 * MIB)
    # The length, once stated, holds: no contradicting it, no bytes past it.
    resp = await patch(http, url, b"", 2 * MIB, **{"Upload-Length": str(3 * MIB)})
    assert resp.status == 204
    assert (await patch(http, url, b"x", 2 * MIB, **{"Upload-Length": "5"})).status == 400
    too_long = await patch(http, url, data[2 * MIB:] + b"!", 2 * MIB)
    assert too_long.status == 400
    assert (await head(http, url)).headers["Upload-Offset"] == str(2 * MIB)
    async with http.post(url, headers={**TUS, "X-HTTP-Method-Override": "HEAD"}) as resp:
        assert resp.status == 200 and resp.headers["Upload-Length"] == str(3 * MIB)
    async with http.post(url, headers={**TUS, "X-HTTP-Method-Override": "GET"}) as resp:
        assert resp.status == 405 and resp.headers["Tus-Resumable"] == "1.0.0"
    assert (await patch(http, url, data[2 * MIB:], 2 * MIB)).status == 204
    assert await stored_object(store_harness, "tus/chunked.bin") == data
    # Finished: a PATCH at its end changes nothing; anywhere else is 409.
    assert (await patch(http, url, b"", len(data))).status == 204
    assert (await patch(http, url, b"more", len(data))).status == 409


async def test_bytes_that_arrived_before_a_cut_count_even_if_unread(
        proxies, http, store_harness) -> None:  # noqa: F811
    """The body bytes the server holds when the connection drops count even
    if the request had not read them yet (here it waits on auth)."""
    import socket

    from app.auth.webhook import AuthRequest
    from app.core.grant import Grant

    asked, gate = asyncio.Event(), asyncio.Event()

    class GatedAppends:
        async def authorize(self, request: AuthRequest) -> Grant:
            if request.action == "append":
                asked.set()
                await gate.wait()
            return Grant()

    proxy = await proxies.start(authorizer=GatedAppends())
    url = await create(http, proxy, MIB, **{"Upload-Metadata": meta(name="unread.bin")})
    server = proxy.runner.server
    assert server is not None
    before = set(server.connections)
    data = os.urandom(100_000)
    head_lines = (f"PATCH /files/{url.rsplit('/', 1)[1]} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  "Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
                  f"Upload-Offset: 0\r\nContent-Length: {MIB}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        await asyncio.to_thread(sock.sendall, head_lines + data)
        async with asyncio.timeout(10):
            await asked.wait()  # the request is in, waiting on auth
    finally:
        sock.close()
    # The connection is gone while auth decides (reading is paused meanwhile,
    # so the server learns of the close only once it reads again).
    assert len(set(server.connections) - before) == 1
    gate.set()
    store = proxy.app[keys.STORE]
    async with asyncio.timeout(10):
        while (await store.get(session_of(url))).offset < len(data):
            await asyncio.sleep(0.02)
    assert (await store.get(session_of(url))).offset == len(data)
