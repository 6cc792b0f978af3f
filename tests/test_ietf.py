"""The IETF resumable-upload draft end to end, with a client written from the
draft text on raw sockets (tests/ietf_client.py): interop version 3 as iOS 17's
URLSession speaks it, and the current draft's 8."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket

import pytest

from app.http import keys
from tests import test_http
from tests.ietf_client import Connection, Exchange, path_of, request, start_then_cut
from tests.test_http import crc_b64, stored_object

proxies = test_http.proxies

MIB = 1024 * 1024
FS = pytest.mark.parametrize("store_kind", ["filesystem"])
PROBLEMS = "https://iana.org/assignments/http-problem-types#"


def v(number: int, **headers: str) -> dict[str, str]:
    return {"Upload-Draft-Interop-Version": str(number), **headers}


def finished_requests(app) -> float:
    metric = app[keys.METRICS].http_requests
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))


async def until_finished(app, before: float, count: int = 1) -> None:
    """Wait until the server has answered ``count`` more requests: a cut one
    has then persisted what arrived."""
    async with asyncio.timeout(20):
        while finished_requests(app) < before + count:
            await asyncio.sleep(0.02)


async def call(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""):
    exchange = await asyncio.to_thread(request, port, method, path, headers, body)
    assert exchange.final is not None
    return exchange


async def cut(proxy, method: str, path: str, headers: dict[str, str], declared: int,
              sent: bytes):
    before = finished_requests(proxy.app)
    interim = await asyncio.to_thread(
        start_then_cut, proxy.port, method, path, headers, declared, sent
    )
    await until_finished(proxy.app, before)
    return interim


def sha256_field(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


# -- interop 8: the current draft ----------------------------------------------------


async def test_current_draft_create_cut_probe_append_complete(proxies, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(13 * MIB + 777)
    first, sent = 9 * MIB, 7 * MIB + 5
    interim = await cut(proxy, "POST", "/files/", v(
        8, **{"Upload-Complete": "?0", "Upload-Length": str(len(data)),
              "Content-Type": "video/mp4",
              "Content-Disposition": "inline; filename=\"clip one.mp4\"; "
                                     "filename*=UTF-8''clip%20%C3%A9t%C3%A9.mp4"}),
        first, data[:sent])
    assert interim.headers["upload-draft-interop-version"] == "8"
    limits = interim.dictionary("upload-limit")
    assert int(limits["max-size"]) >= len(data)
    assert limits["min-size"] == "0"
    assert 0 < int(limits["max-age"]) <= 7 * 24 * 3600
    location = interim.headers["location"]
    assert location.startswith(proxy.url + "/files/")
    upload_id = location.rsplit("/", 1)[1]
    assert len(base64.urlsafe_b64decode(upload_id + "=" * (-len(upload_id) % 4))) >= 16
    path = path_of(location)

    head = (await call(proxy.port, "HEAD", path, v(8))).final
    assert head.status == 204
    assert head.headers["upload-offset"] == str(sent)
    assert head.headers["upload-complete"] == "?0"
    assert head.headers["upload-length"] == str(len(data))
    assert head.headers["cache-control"] == "no-store"
    assert "upload-limit" in head.headers

    middle = 10 * MIB
    patch = v(8, **{"Upload-Complete": "?0", "Content-Type": "application/partial-upload"})
    answer = (await call(proxy.port, "PATCH", path, {**patch, "Upload-Offset": str(sent)},
                         data[sent:middle])).final
    assert answer.status == 204
    assert answer.headers["upload-complete"] == "?0"
    assert answer.headers["upload-offset"] == str(middle)

    done = (await call(proxy.port, "PATCH", path,
                       {**patch, "Upload-Complete": "?1", "Upload-Offset": str(middle)},
                       data[middle:])).final
    assert done.status == 200
    assert done.headers["upload-complete"] == "?1"
    doc = done.json()
    assert doc["name"] == "tus/clip été.mp4"
    assert doc["size"] == len(data)
    assert doc["contentType"] == "video/mp4"
    assert doc["crc32c"] == crc_b64(data)
    assert done.headers["repr-digest"] == f"crc32c=:{crc_b64(data)}:"
    assert await stored_object(store_harness, "tus/clip été.mp4") == data

    # The final answer is kept: HEAD says complete, an empty ?1 append replays it.
    head = (await call(proxy.port, "HEAD", path, v(8))).final
    assert (head.headers["upload-complete"], head.headers["upload-offset"]) == (
        "?1", str(len(data)))
    replay = (await call(proxy.port, "PATCH", path,
                         {**patch, "Upload-Complete": "?1",
                          "Upload-Offset": str(len(data))})).final
    assert replay.status == 200
    assert replay.json() == doc


@FS
async def test_optimistic_creation_in_one_request(proxies, store_harness) -> None:
    """``Upload-Complete: ?1`` with the whole body: 104 first, then the object."""
    proxy = await proxies.start()
    data = os.urandom(300_000)
    exchange = await call(proxy.port, "PUT", "/files/",
                          v(8, **{"Upload-Complete": "?1", "Content-Type": "image/png"}), data)
    assert [r.status for r in exchange.interim] == [104]
    final = exchange.final
    assert final.status == 200
    assert final.headers["upload-complete"] == "?1"
    name = final.json()["name"]
    upload_id = exchange.interim[0].headers["location"].rsplit("/", 1)[1]
    assert name == f"tus/{upload_id}"
    assert await stored_object(store_harness, name) == data


@FS
async def test_mismatching_offset_is_a_409_problem(proxies) -> None:
    proxy = await proxies.start()
    created = (await call(proxy.port, "POST", "/files/", v(8, **{"Upload-Complete": "?0"}),
                          b"x" * 1000)).final
    assert created.status == 201
    assert created.headers["upload-offset"] == "1000"
    path = path_of(created.headers["location"])
    answer = (await call(proxy.port, "PATCH", path, v(8, **{
        "Upload-Complete": "?1", "Upload-Offset": "1500",
        "Content-Type": "application/partial-upload"}), b"y" * 10)).final
    assert answer.status == 409
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.headers["upload-offset"] == "1000"
    assert answer.headers["upload-complete"] == "?0"
    problem = answer.json()
    assert problem["type"] == PROBLEMS + "mismatching-upload-offset"
    assert (problem["expected-offset"], problem["provided-offset"]) == (1000, 1500)
    for method in ("HEAD", "GET"):  # the draft allows GET too
        head = (await call(proxy.port, method, path, v(8))).final
        assert (head.status, head.headers["upload-offset"]) == (204, "1000")


@FS
async def test_content_digest_mismatch_stores_nothing(proxies, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(200_000)
    created = (await call(proxy.port, "POST", "/files/", v(8, **{
        "Upload-Complete": "?0", "Content-Digest": sha256_field(data[:50_000])}),
        data[:50_000])).final
    assert created.status == 201
    path = path_of(created.headers["location"])
    patch = v(8, **{"Upload-Complete": "?1", "Upload-Offset": "50000",
                    "Content-Type": "application/partial-upload"})
    wrong = (await call(proxy.port, "PATCH", path,
                        {**patch, "Content-Digest": sha256_field(b"other bytes")},
                        data[50_000:])).final
    assert wrong.status == 400
    assert wrong.json()["code"] == "checksum_mismatch"
    assert wrong.headers["upload-complete"] == "?0"
    head = (await call(proxy.port, "HEAD", path, v(8))).final
    assert head.headers["upload-offset"] == "50000"
    sha512 = "sha-512=:" + base64.b64encode(hashlib.sha512(data[50_000:]).digest()).decode()
    right = (await call(proxy.port, "PATCH", path,
                        {**patch, "Content-Digest": sha512 + ":, md5=:AAAA:",
                         "Repr-Digest": f"crc32c=:{crc_b64(data)}:"}, data[50_000:])).final
    assert right.status == 200, right.body
    assert await stored_object(store_harness, right.json()["name"]) == data


@FS
async def test_repr_digest_mismatch_ends_the_upload(proxies) -> None:
    proxy = await proxies.start()
    exchange = await call(proxy.port, "POST", "/files/", v(8, **{
        "Upload-Complete": "?1", "Repr-Digest": f"crc32c=:{crc_b64(b'not these')}:"}),
        b"these bytes")
    answer = exchange.final
    assert answer.status == 400
    assert answer.json()["code"] == "digest_mismatch"
    # ?1: the answer is about the representation; resuming would not help.
    assert answer.headers["upload-complete"] == "?1"
    path = path_of(exchange.interim[0].headers["location"])
    assert (await call(proxy.port, "HEAD", path, v(8))).final.status == 404


@FS
async def test_delete_options_and_bad_requests(proxies) -> None:
    proxy = await proxies.start(storage={"max_upload_size": 10 * MIB})
    options = (await call(proxy.port, "OPTIONS", "/files/", v(8))).final
    assert options.status == 204
    limits = options.dictionary("upload-limit")
    assert (limits["max-size"], limits["min-size"]) == (str(10 * MIB), "0")
    assert int(limits["max-age"]) == 7 * 24 * 3600

    created = (await call(proxy.port, "POST", "/files/", v(8, **{"Upload-Complete": "?0"}),
                          b"abc")).final
    path = path_of(created.headers["location"])
    assert (await call(proxy.port, "DELETE", path, v(8))).final.status == 204
    for method in ("HEAD", "DELETE"):
        gone = (await call(proxy.port, method, path, v(8))).final
        assert gone.status == 404
    unknown = (await call(proxy.port, "HEAD", "/files/" + "A" * 32, v(8))).final
    assert unknown.status == 404

    too_big = (await call(proxy.port, "POST", "/files/", v(8, **{
        "Upload-Complete": "?0", "Upload-Length": str(11 * MIB)}))).final
    assert too_big.status == 413
    assert too_big.json()["status"] == 413
    assert "upload-limit" in too_big.headers

    for headers, status in (
        (v(2, **{"Upload-Complete": "?1"}), 400),  # no such interop version
        (v(8, **{"Upload-Complete": "yes"}), 400),  # not a Boolean
        (v(8), 400),  # creation must say whether it is complete
        (v(8, **{"Upload-Complete": "?1", "Upload-Length": "5"}), 400),  # 3 bytes sent
    ):
        answer = (await call(proxy.port, "POST", "/files/", headers, b"abc")).final
        assert answer.status == status, (headers, answer.body)
        problem = answer.json()
        assert problem["detail"] and problem["status"] == status

    created = (await call(proxy.port, "POST", "/files/", v(6, **{"Upload-Complete": "?0"}),
                          b"abc")).final
    path = path_of(created.headers["location"])
    untyped = (await call(proxy.port, "PATCH", path, v(6, **{
        "Upload-Complete": "?1", "Upload-Offset": "3"}), b"def")).final
    assert untyped.status == 415
    assert untyped.headers["accept-patch"] == "application/partial-upload"
    assert (await call(proxy.port, "HEAD", path, v(6, **{"Upload-Offset": "3"}))
            ).final.status == 400


# -- interop 3: iOS 17 URLSession ----------------------------------------------------


async def test_interop_3_like_urlsession(proxies, store_harness) -> None:
    """iOS 17 sends the whole file with ``Upload-Incomplete: ?0`` and resumes
    after a drop with HEAD and a PATCH without a content type."""
    proxy = await proxies.start()
    data = os.urandom(11 * MIB + 3)
    sent = 6 * MIB + 1234
    interim = await cut(proxy, "POST", "/files/", v(3, **{
        "Upload-Incomplete": "?0", "Content-Type": "application/octet-stream"}),
        len(data), data[:sent])
    assert interim.headers["upload-draft-interop-version"] == "3"
    assert "upload-limit" not in interim.headers
    path = path_of(interim.headers["location"])

    head = (await call(proxy.port, "HEAD", path, v(3))).final
    assert head.status == 204
    assert head.headers["upload-offset"] == str(sent)
    assert head.headers["upload-incomplete"] == "?1"
    assert "upload-complete" not in head.headers
    assert head.headers["cache-control"] == "no-store"
    # -01: a probe must not carry the upload fields.
    bad = (await call(proxy.port, "HEAD", path, v(3, **{"Upload-Incomplete": "?1"}))).final
    assert bad.status == 400

    half = 9 * MIB
    step = (await call(proxy.port, "PATCH", path, v(3, **{
        "Upload-Offset": str(sent), "Upload-Incomplete": "?1"}), data[sent:half])).final
    assert step.status == 201
    assert step.headers["upload-offset"] == str(half)
    assert step.headers["upload-incomplete"] == "?1"
    # No Upload-Incomplete: in -01 this is the last part.
    done = (await call(proxy.port, "PATCH", path, v(3, **{"Upload-Offset": str(half)}),
                       data[half:])).final
    assert done.status == 200
    assert done.headers["upload-incomplete"] == "?0"
    assert done.headers["upload-offset"] == str(len(data))
    doc = done.json()
    assert doc["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, doc["name"]) == data
    head = (await call(proxy.port, "HEAD", path, v(3))).final
    assert head.headers["upload-incomplete"] == "?0"


@FS
async def test_new_request_ends_a_stalled_append(proxies, store_harness) -> None:
    """A client whose link hung mid-PATCH probes again: the HEAD ends the old
    request (which keeps what it had) instead of waiting for it to time out."""
    proxy = await proxies.start(server={"read_timeout": 60})
    data = os.urandom(3 * MIB)
    created = (await call(proxy.port, "POST", "/files/", v(8, **{
        "Upload-Complete": "?0", "Upload-Length": str(len(data))}), data[:MIB])).final
    path = path_of(created.headers["location"])
    stalled = Connection(proxy.port)
    try:
        stalled.send_head("PATCH", path, v(8, **{
            "Upload-Complete": "?1", "Upload-Offset": str(MIB),
            "Content-Type": "application/partial-upload", "Content-Length": str(2 * MIB)}))
        stalled.send(data[MIB:MIB + MIB // 2])
        writers = proxy.app[keys.WRITERS]
        async with asyncio.timeout(10):  # the PATCH holds the upload: it is writing
            while not writers.active:
                await asyncio.sleep(0.02)
        async with asyncio.timeout(15):  # far below the 60 s read timeout
            head = (await call(proxy.port, "HEAD", path, v(8))).final
        offset = int(head.headers["upload-offset"])
        assert MIB <= offset <= MIB + MIB // 2
        # The old request was answered with the offset it reached, no more.
        old = await asyncio.to_thread(stalled.read_response)
        assert old.status == 204
        assert (old.headers["upload-offset"], old.headers["upload-complete"]) == (
            str(offset), "?0")
    finally:
        stalled.close()
    done = (await call(proxy.port, "PATCH", path, v(8, **{
        "Upload-Complete": "?1", "Upload-Offset": str(offset),
        "Content-Type": "application/partial-upload"}), data[offset:])).final
    assert done.status == 200
    assert await stored_object(store_harness, done.json()["name"]) == data


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@FS
async def test_bodies_of_unknown_length(proxies, store_harness) -> None:
    """No Content-Length (chunked): a creation with ``?0`` keeps what came, an
    append with ``?1`` ends the upload where its body ends."""
    proxy = await proxies.start()
    data = os.urandom(700_000)

    def exchange(method: str, path: str, headers: dict[str, str], body: bytes):
        conn = Connection(proxy.port)
        try:
            conn.send_head(method, path, {**headers, "Transfer-Encoding": "chunked"})
            conn.send(body)
            return conn.read_final(Exchange())
        finally:
            conn.close()

    created = await asyncio.to_thread(exchange, "POST", "/files/", v(8, **{
        "Upload-Complete": "?0"}), chunked(data[:100_000], data[100_000:300_000]))
    assert created.final.status == 201
    assert created.final.headers["upload-offset"] == "300000"
    path = path_of(created.final.headers["location"])
    head = (await call(proxy.port, "HEAD", path, v(8))).final
    assert "upload-length" not in head.headers  # nothing said it yet
    done = await asyncio.to_thread(exchange, "PATCH", path, v(8, **{
        "Upload-Complete": "?1", "Upload-Offset": "300000",
        "Content-Type": "application/partial-upload"}), chunked(data[300_000:]))
    assert done.final.status == 200
    assert done.final.json()["size"] == len(data)
    assert await stored_object(store_harness, done.final.json()["name"]) == data


@FS
async def test_http10_client_gets_no_interim_response(proxies, store_harness) -> None:
    proxy = await proxies.start()

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /files/ HTTP/1.0\r\nHost: x\r\nUpload-Draft-Interop-Version: 8"
                         b"\r\nUpload-Complete: ?1\r\nContent-Length: 5\r\n\r\nhello")
            sock.settimeout(10)
            answer = b""
            while data := sock.recv(65536):
                answer += data
            return answer

    answer = await asyncio.to_thread(exchange)
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer
    assert b" 104 " not in answer
    name = json.loads(answer.split(b"\r\n\r\n", 1)[1])["name"]
    assert await stored_object(store_harness, name) == b"hello"


@FS
@pytest.mark.parametrize("number", [3, 4, 5, 6, 7, 8])
async def test_every_interop_version_from_its_draft(proxies, store_harness, number: int) -> None:
    """Each version's own field names, statuses and rules, in one short upload."""
    proxy = await proxies.start()
    early = number == 3

    def state(complete: bool) -> dict[str, str]:
        if early:
            return {"Upload-Incomplete": "?0" if complete else "?1"}
        return {"Upload-Complete": "?1" if complete else "?0"}

    typed = {"Content-Type": "application/partial-upload"} if number >= 6 else {}
    data = os.urandom(3000)
    created = (await call(proxy.port, "POST", "/files/", v(number, **state(False)),
                          data[:1000])).final
    assert created.status == 201
    assert created.headers["upload-offset"] == "1000"
    assert ("upload-limit" in created.headers) is (number >= 6)
    path = path_of(created.headers["location"])
    head = (await call(proxy.port, "HEAD", path, v(number))).final
    assert head.status == 204
    field = "upload-incomplete" if early else "upload-complete"
    assert head.headers[field] == ("?1" if early else "?0")
    if number == 6:
        assert "expires" in head.dictionary("upload-limit")
    if number >= 7:
        assert "max-age" in head.dictionary("upload-limit")
    step = (await call(proxy.port, "PATCH", path, v(number, **state(False), **typed,
                       **{"Upload-Offset": "1000"}), data[1000:2000])).final
    assert step.status == (201 if number <= 6 else 204)
    assert step.headers["upload-offset"] == "2000"
    done = (await call(proxy.port, "PATCH", path, v(number, **state(True), **typed,
                       **{"Upload-Offset": "2000"}), data[2000:])).final
    assert done.status == 200
    assert done.headers[field] == ("?0" if early else "?1")
    assert await stored_object(store_harness, done.json()["name"]) == data
    again = (await call(proxy.port, "PATCH", path, v(number, **state(True), **typed,
                        **{"Upload-Offset": "3000"}))).final
    if number in (3, 8):
        assert again.status == 200
        assert again.json() == done.json()
    else:
        assert again.status == 400
        assert again.json()["type"] == PROBLEMS + "completed-upload"
