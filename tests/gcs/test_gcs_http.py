"""The GCS dialect over HTTP: sessions, Google's conventions, errors, auth."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import dataclass, field

import aiohttp
import pytest

from app.auth.webhook import AuthRequest
from app.core.grant import Grant
from app.errors import Forbidden
from app.http import keys
from tests.gcs.support import BUCKET, MIB, gcs_proxies, start_gcs, stored  # noqa: F401
from tests.test_http import crc_b64, md5_b64, wait_idle

UPLOAD = f"/upload/storage/v1/b/{BUCKET}/o"


async def initiate(http: aiohttp.ClientSession, base: str, name: str, **headers: str) -> str:
    async with http.post(f"{base}{UPLOAD}?uploadType=resumable", json={"name": name},
                         headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        location = resp.headers["Location"]
        assert resp.headers["X-GUploader-UploadID"] in location
        assert location.startswith(f"{base}{UPLOAD}?uploadType=resumable&upload_id=")
        return location


async def put(http: aiohttp.ClientSession, url: str, data: bytes | None, content_range: str,
              **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with http.put(url, data=data, allow_redirects=False,
                        headers={"Content-Range": content_range, **headers}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def google_error(body: bytes, code: int, reason: str) -> str:
    doc = json.loads(body)["error"]
    assert doc["code"] == code
    assert doc["errors"][0]["reason"] == reason and doc["errors"][0]["domain"] == "global"
    return doc["message"]


async def test_unknown_buckets_and_upload_ids_are_404_in_googles_shape(
    gcs_proxies, http  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    async with http.post(f"{proxy.url}/upload/storage/v1/b/other/o?uploadType=resumable",
                         json={"name": "x"}) as resp:
        assert resp.status == 404
        assert "other" in google_error(await resp.read(), 404, "notFound")
    async with http.get(f"{proxy.url}/storage/v1/b/other") as resp:
        assert resp.status == 404
    async with http.get(f"{proxy.url}/storage/v1/b/{BUCKET}") as resp:
        doc = await resp.json()
        assert (doc["kind"], doc["name"]) == ("storage#bucket", BUCKET)
    for upload_id in ("A" * 32, "bad!", ""):
        status, _, body = await put(
            http, f"{proxy.url}{UPLOAD}?uploadType=resumable&upload_id={upload_id}", b"x",
            "bytes 0-0/1",
        )
        assert status == 404, upload_id
        google_error(body, 404, "notFound")


@pytest.mark.parametrize(
    ("query", "body", "needle"),
    [
        ("uploadType=resumable", {}, "name"),
        ("uploadType=resumable", {"name": "../x"}, "segments"),
        ("uploadType=nope", {"name": "x"}, "uploadType"),
        ("uploadType=resumable&ifGenerationMatch=5", {"name": "x"}, "ifGenerationMatch"),
    ],
)
async def test_bad_initiations_are_400_in_googles_shape(
    gcs_proxies, http, query: str, body: dict, needle: str  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    async with http.post(f"{proxy.url}{UPLOAD}?{query}", json=body) as resp:
        assert resp.status == 400
        assert needle in google_error(await resp.read(), 400, "invalid")


async def test_session_chunks_probes_no_308_and_cancel(
    gcs_proxies, store_harness, http  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    data = os.urandom(3 * 256 * 1024 + 10)
    url = await initiate(http, proxy.url, "s/one.bin")
    status, headers, _ = await put(http, url, None, "bytes */*")
    assert status == 308 and "Range" not in headers
    status, headers, _ = await put(http, url, data[:262144], "bytes 0-262143/*")
    assert (status, headers["Range"]) == (308, "bytes=0-262143")
    # Clients whose HTTP stack follows 308 ask for a 200 that says 308.
    status, headers, _ = await put(http, url, data[262144:524288], "bytes 262144-524287/*",
                                   **{"X-GUploader-No-308": "yes"})
    assert (status, headers["X-Http-Status-Code-Override"], headers["Range"]) == (
        200, "308", "bytes=0-524287")
    # The rest as a body of unknown length with the total: 'bytes a-*/T'.
    status, _, body = await put(http, url, data[524288:], f"bytes 524288-*/{len(data)}",
                                **{"x-goog-hash": f"crc32c={crc_b64(data)}"})
    assert status == 200, body
    doc = json.loads(body)
    assert (doc["name"], doc["bucket"], doc["size"]) == ("s/one.bin", BUCKET, str(len(data)))
    assert doc["crc32c"] == crc_b64(data) and doc["md5Hash"] == md5_b64(data)
    assert await stored(store_harness, "s/one.bin") == data
    # A repeat after completion answers the same object.
    status, _, again = await put(http, url, None, f"bytes */{len(data)}")
    assert status == 200 and json.loads(again)["generation"] == doc["generation"]

    other = await initiate(http, proxy.url, "s/two.bin")
    async with http.delete(other) as resp:
        assert resp.status == 499
    status, _, body = await put(http, other, b"x", "bytes 0-0/1")
    assert status == 404
    google_error(body, 404, "notFound")


async def test_streamed_body_cut_keeps_what_arrived_and_a_clean_end_ends_the_object(
    gcs_proxies, store_harness, http  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    data = os.urandom(2 * MIB + 77)
    url = await initiate(http, proxy.url, "s/stream.bin")
    path = url.removeprefix(proxy.url)
    # 'bytes 0-*/*' with a chunked body that stops after 1 MiB: the client
    # half-closes, so the server sees every byte sent, then the end of the
    # stream mid-body; it answers (or closes) once it has persisted them.
    head = (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            "Content-Range: bytes 0-*/*\r\n\r\n")
    first = data[:MIB]
    await asyncio.to_thread(half_close, proxy.port,
                            head.encode() + f"{len(first):x}\r\n".encode() + first + b"\r\n")
    await wait_idle(proxy.app)
    status, headers, _ = await put(http, url, None, "bytes */*")
    # Everything that arrived is kept, and the total stays open.
    assert (status, headers["Range"]) == (308, f"bytes=0-{MIB - 1}")
    start = MIB // 2
    # Resent from an earlier byte (overlap is skipped), ending cleanly: the end.
    status, _, body = await put(http, url, data[start:], f"bytes {start}-*/*")
    assert status == 200, body
    assert json.loads(body)["size"] == str(len(data))
    assert await stored(store_harness, "s/stream.bin") == data


def half_close(port: int, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        while sock.recv(65536):
            pass


async def test_the_last_session_to_complete_wins(
    gcs_proxies, store_harness, http  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    older = await initiate(http, proxy.url, "same.bin")
    newer = await initiate(http, proxy.url, "same.bin")
    status, _, _ = await put(http, older, b"old-part", "bytes 0-7/*")
    assert status == 308
    status, _, body_new = await put(http, newer, b"newer", "bytes 0-4/5")
    assert status == 200
    assert await stored(store_harness, "same.bin") == b"newer"
    # The older session kept its own bytes and completes after: it wins.
    status, _, body_old = await put(http, older, b"!", "bytes 8-8/9")
    assert status == 200
    assert await stored(store_harness, "same.bin") == b"old-part!"
    assert int(json.loads(body_old)["generation"]) > int(json.loads(body_new)["generation"])


@pytest.mark.parametrize("newline", ["\r\n", "\n"], ids=["crlf", "bare-lf"])
async def test_multipart_and_media_uploads(
    gcs_proxies, store_harness, http, newline: str  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    # Near-delimiters in the media; a boundary this long cannot turn up in
    # random bytes by chance.
    bnd = b"proxy-test-boundary-0123456789"
    nl = newline.encode()
    media = os.urandom(MIB + 3) + nl + b"-" + bnd + b"--" + bnd
    meta = json.dumps({"name": "mp/a.bin", "metadata": {"k": "v"}, "md5Hash": md5_b64(media)})
    body = (b"--" + bnd + nl + b"Content-Type: application/json" + nl + nl + meta.encode() + nl
            + b"--" + bnd + nl + b"Content-Type: image/png" + nl + nl + media + nl
            + b"--" + bnd + b"--")
    content_type = f'multipart/related; boundary="{bnd.decode()}"'
    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=multipart", data=body,
                         headers={"Content-Type": content_type}) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    assert (doc["name"], doc["contentType"], doc["metadata"]) == ("mp/a.bin", "image/png",
                                                                  {"k": "v"})
    assert doc["md5Hash"] == md5_b64(media)
    assert await stored(store_harness, "mp/a.bin") == media

    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=media&name=md/b.txt", data=b"plain",
                         headers={"Content-Type": "text/plain"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["size"] == "5"
    assert await stored(store_harness, "md/b.txt") == b"plain"


async def test_multipart_without_closing_boundary_stores_nothing(
    gcs_proxies, store_harness, http  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    body = b'--b\r\n\r\n{"name": "mp/open.bin"}\r\n--b\r\n\r\nno end here'
    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=multipart", data=body,
                         headers={"Content-Type": "multipart/related; boundary=b"}) as resp:
        assert resp.status == 400
        assert "closing boundary" in google_error(await resp.read(), 400, "invalid")
    three = (b'--b\r\n\r\n{"name": "mp/three.bin"}\r\n--b\r\n\r\nsecond\r\n'
             b"--b\r\n\r\nthird\r\n--b--")
    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=multipart", data=three,
                         headers={"Content-Type": "multipart/related; boundary=b"}) as resp:
        assert resp.status == 400
        assert "two parts" in google_error(await resp.read(), 400, "invalid")
    for name in ("mp/open.bin", "mp/three.bin"):
        with pytest.raises(Exception):  # noqa: B017 - missing: the store's own error
            await stored(store_harness, name)
    # Neither left a session behind.
    assert [i async for i in proxy.app[keys.STORE].list_unfinished()] == []
    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=multipart&name=mp/wrong.bin",
                         data=b"{}", headers={"Content-Type": "text/plain"}) as resp:
        assert resp.status == 400


@dataclass
class Recording:
    """An authorizer that records what it was asked and binds owners by header."""

    seen: list[AuthRequest] = field(default_factory=list)

    async def authorize(self, request: AuthRequest) -> Grant:
        self.seen.append(request)
        user = request.headers.get("X-User")
        if user == "nobody":
            raise Forbidden("not you")
        return Grant(owner=user)


async def test_the_webhook_is_asked_with_the_object_name_and_owners_are_bound(
    gcs_proxies, http  # noqa: F811
) -> None:
    auth = Recording()
    proxy = await gcs_proxies.start(authorizer=auth, gcs={"buckets": {BUCKET: "media/"}})
    url = await initiate(http, proxy.url, "o/x.bin", **{"X-User": "alice"})
    status, _, body = await put(http, url, b"abc", "bytes 0-2/*", **{"X-User": "bob"})
    assert status == 403
    google_error(body, 403, "forbidden")
    status, _, _ = await put(http, url, b"abc", "bytes 0-2/3", **{"X-User": "alice"})
    assert status == 200
    assert [(r.action, r.name, r.key, r.dialect, dict(r.extra)) for r in auth.seen] == [
        ("create", "o/x.bin", "media/o/x.bin" if "s3" not in proxy.config.storage.backend
         else "uploads/media/o/x.bin", "gcs", {"bucket": BUCKET}),
    ] + [("append", "o/x.bin", auth.seen[1].key, "gcs", {"bucket": BUCKET})] * 2
    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=media&name=o/y.bin", data=b"z",
                         headers={"X-User": "nobody"}) as resp:
        assert resp.status == 403


async def test_no_dialect_shows_the_filesystem_root(
    gcs_proxies, store_harness, http  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    async with http.put(f"{proxy.url}/upload/ours/a.txt", data=b"abc") as resp:
        doc = await resp.json()
    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=media&name=b.txt", data=b"abc") as resp:
        gcs_doc = await resp.json()
    if store_harness.kind == "filesystem":
        assert "bucket" not in doc
    else:
        assert doc["bucket"] == store_harness.storage.s3.bucket
    assert gcs_doc["bucket"] == BUCKET
    root = str(store_harness.storage.filesystem.root)
    assert root not in json.dumps(doc) and root not in json.dumps(gcs_doc)


async def test_if_generation_match_zero_creates_only_an_absent_object(
    gcs_proxies, store_harness, http  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=media&name=taken.bin",
                         data=b"first") as resp:
        assert resp.status == 200
    query = "uploadType=resumable&ifGenerationMatch=0"
    async with http.post(f"{proxy.url}{UPLOAD}?{query}", json={"name": "taken.bin"}) as resp:
        assert resp.status == 412
        google_error(await resp.read(), 412, "conditionNotMet")
    async with http.post(f"{proxy.url}{UPLOAD}?{query}", json={"name": "free.bin"}) as resp:
        assert resp.status == 200
    async with http.post(f"{proxy.url}{UPLOAD}?uploadType=media&name=taken.bin&{query[19:]}",
                         data=b"second") as resp:
        assert resp.status == 412
    assert await stored(store_harness, "taken.bin") == b"first"
