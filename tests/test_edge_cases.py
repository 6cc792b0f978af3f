"""Edge cases of the wire contract (docs/protocol.md) on the real app over a real port.

Bad input must get a JSON 4xx (never a 500 or a traceback) and must never damage
an upload in progress; acknowledged bytes must be stored; odd but legal clients
(chunked bodies, HTTP/1.0, Expect) must be served.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import pytest
import yarl

from app.http import keys
from tests import test_http
from tests.http_support import raw_request, read_head, wait_until_server_read_all
from tests.test_http import crc_b64, probe, put_range, stored_object

# The end-to-end fixtures of test_http (a proxy factory over store_harness, a client).
proxies = test_http.proxies

MIB = 1024 * 1024
FS = pytest.mark.parametrize("store_kind", ["filesystem"])


def split_response(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of the first final response."""
    while answer.startswith(b"HTTP/1.1 100") or answer.startswith(b"HTTP/1.0 100"):
        answer = answer.split(b"\r\n\r\n", 1)[1]
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


async def raw(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    answer = await asyncio.to_thread(raw_request, port, head, body, close_after_body=False)
    assert answer, "the server closed the connection without an answer"
    return split_response(answer)


def chunked(*pieces: bytes) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return out + b"0\r\n\r\n"


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers.get("content-type", "").startswith("application/json"), (headers, body)
    assert b"Traceback" not in body
    doc = json.loads(body)
    assert doc["error"]
    return doc


# -- methods, Expect, HTTP versions --------------------------------------------------


@FS
@pytest.mark.parametrize("method", ["GET", "HEAD", "PATCH"])
async def test_other_methods_on_upload_are_json_405(proxies, method) -> None:
    proxy = await proxies.start()
    status, headers, body = await raw(
        proxy.port, f"{method} /upload/x.bin HTTP/1.1\r\nHost: x\r\nConnection: close"
    )
    assert status == 405
    assert "PUT" in headers.get("allow", "")
    if method != "HEAD":
        assert_json_error(status, headers, body, 405)


@FS
async def test_expect_other_than_100_continue_is_json_417(proxies) -> None:
    proxy = await proxies.start()
    status, headers, body = await raw(
        proxy.port,
        "PUT /upload/expect.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        "Expect: something-else\r\nConnection: close",
        b"abc",
    )
    assert_json_error(status, headers, body, 417)


@FS
async def test_post_with_expect_100_continue_gets_its_continue(proxies) -> None:
    """A GCS-style initiation with a metadata body and ``Expect: 100-continue``:
    the client sends nothing until it gets the 100, so the proxy must send it."""
    proxy = await proxies.start()
    body = json.dumps({"metadata": {"k": "v"}}).encode()
    head = (f"POST /upload/expect/post.bin HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n"
            "X-Upload-Content-Length: 10\r\nExpect: 100-continue\r\nConnection: close")

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n")
            sock.settimeout(3)
            try:
                first = sock.recv(65536)
            except TimeoutError:
                return b""
            if first.startswith(b"HTTP/1.1 100"):
                sock.sendall(body)
                sock.settimeout(10)
                rest = b""
                while data := sock.recv(65536):
                    rest += data
                return first + rest
            return first

    answer = await asyncio.to_thread(exchange)
    assert answer.startswith(b"HTTP/1.1 100"), answer or "no answer within 3 s: a deadlock"
    status, _, _ = split_response(answer)
    assert status == 200


@FS
async def test_http10_client_uploads_probes_and_resumes(proxies, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(3000)
    status, headers, _ = await raw(
        proxy.port,
        "PUT /upload/old/client.bin HTTP/1.0\r\nHost: x\r\nContent-Length: 1000\r\n"
        f"Content-Range: bytes 0-999/{len(data)}",
        data[:1000],
    )
    assert status == 308
    assert headers["range"] == "bytes=0-999"
    assert "location" not in headers
    status, headers, _ = await raw(
        proxy.port, "PUT /upload/old/client.bin HTTP/1.0\r\nHost: x\r\nContent-Range: bytes */*"
    )
    assert status == 308
    assert headers["range"] == "bytes=0-999"
    # HTTP/1.0 has no 100 Continue: an Expect header from it must not stall the upload.
    status, _, body = await raw(
        proxy.port,
        "PUT /upload/old/client.bin HTTP/1.0\r\nHost: x\r\nContent-Length: 2000\r\n"
        f"Expect: 100-continue\r\nContent-Range: bytes 1000-2999/{len(data)}",
        data[1000:],
    )
    assert status == 200, body
    assert json.loads(body)["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, "old/client.bin") == data


# -- header values ---------------------------------------------------------------------


@FS
@pytest.mark.parametrize("value", ["abc", "-1"])
async def test_malformed_content_length_is_400_without_traceback(proxies, value) -> None:
    # aiohttp's HTTP parser answers unparseable requests itself, before the app
    # and its JSON middleware run: the status is right, the body is its text.
    proxy = await proxies.start()
    status, _, body = await raw(
        proxy.port,
        f"PUT /upload/cl.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n"
        "Content-Range: bytes 0-2/3\r\nConnection: close",
        b"abc",
    )
    assert status == 400
    assert b"Traceback" not in body


@FS
@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "99999999999999999999", "0x10", ""])
async def test_garbage_upload_content_length_is_400_and_keeps_the_upload(
    proxies, http, value
) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/xucl.bin"
    assert (await put_range(http, url, b"x" * 10, 0, None)).status == 308
    async with http.post(url, headers={"X-Upload-Content-Length": value}) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]
    resp = await probe(http, url)
    assert resp.status == 308
    assert resp.headers["Range"] == "bytes=0-9"


@FS
@pytest.mark.parametrize("value", ["bytes 0-9999999999999999998/*",
                                   "bytes 0-9/9999999999999999999"])
async def test_huge_content_range_is_413_and_creates_nothing(proxies, http, value) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/huge.bin"

    async def body():
        yield b"0123456789"

    async with http.put(url, data=body(), headers={"Content-Range": value}) as resp:
        assert resp.status == 413, await resp.text()
        assert (await resp.json())["error"] == "too_large"
    assert (await probe(http, url)).status == 404


@FS
async def test_oversized_header_is_4xx_without_traceback(proxies) -> None:
    proxy = await proxies.start()
    status, _, body = await raw(
        proxy.port,
        "PUT /upload/big-header.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        f"Content-Range: bytes {'1' * 20000}-2/3\r\nConnection: close",
    )
    assert 400 <= status < 500
    assert b"Traceback" not in body


# -- names --------------------------------------------------------------------------------


@FS
async def test_empty_name_is_400_invalid_name(proxies, http) -> None:
    proxy = await proxies.start()
    async with http.put(f"{proxy.url}/upload/", data=b"x") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_name"


@FS
@pytest.mark.parametrize("path", ["%FF", "a/%C3%28", "%ED%A0%80x"])
async def test_non_utf8_percent_escapes_are_400(proxies, http, path) -> None:
    """A name is the percent-decoded path; bytes that are not UTF-8 cannot be a
    name, and must not silently become the literal text ``%FF``."""
    proxy = await proxies.start()
    async with http.put(yarl.URL(f"{proxy.url}/upload/{path}", encoded=True), data=b"x") as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"] == "invalid_name"


@FS
async def test_non_utf8_raw_byte_in_path_is_400(proxies) -> None:
    proxy = await proxies.start()
    status, _, body = await raw(
        proxy.port, "PUT /upload/a\xffb HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        "Connection: close", b"x",
    )
    assert status == 400, body
    assert b"Traceback" not in body


@FS
async def test_percent_encoded_names_are_decoded_exactly_once(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    for path, name in [("a%252Fb.bin", "a%2Fb.bin"), ("dir%2Ffile.bin", "dir/file.bin"),
                       ("caf%C3%A9%20%2B.bin", "café +.bin")]:
        async with http.put(yarl.URL(f"{proxy.url}/upload/{path}", encoded=True),
                            data=name.encode()) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["name"] == name
        assert await stored_object(store_harness, name) == name.encode()


# -- bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
async def test_chunked_body_longer_than_range_is_400_and_keeps_the_range(
    proxies, http, store_harness
) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/long-body.bin"
    data = os.urandom(3000)
    status, headers, body = await raw(
        proxy.port,
        "PUT /upload/long-body.bin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Range: bytes 0-999/{len(data)}\r\nConnection: close",
        chunked(data[:600], data[600:1500]),
    )
    doc = assert_json_error(status, headers, body, 400)
    assert doc["error"] == "length_mismatch"
    resp = await probe(http, url)
    assert resp.status == 308
    assert resp.headers["Range"] == "bytes=0-999"
    resp = await put_range(http, url, data[1000:], 1000, len(data))
    assert resp.status == 200
    assert (await resp.json())["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, "long-body.bin") == data


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
async def test_body_longer_than_range_ending_at_total_does_not_complete(
    proxies, http, store_harness
) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/long-last.bin"
    status, headers, body = await raw(
        proxy.port,
        "PUT /upload/long-last.bin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        "Content-Range: bytes 0-9/10\r\nConnection: close",
        chunked(b"0123456789", b"extra"),
    )
    assert_json_error(status, headers, body, 400)
    resp = await probe(http, url)
    assert resp.status == 308
    assert resp.headers["Range"] == "bytes=0-9"
    # The client learns all 10 bytes are there and finalizes.
    resp = await probe(http, url, "10")
    assert resp.status == 200
    assert await stored_object(store_harness, "long-last.bin") == b"0123456789"


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
async def test_chunk_fully_inside_stored_prefix_writes_nothing(
    proxies, http, store_harness
) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/inside.bin"
    data = os.urandom(5000)
    assert (await put_range(http, url, data[:3000], 0, len(data))).status == 308
    # A stale retry of an older chunk, with different (wrong) bytes: skipped.
    resp = await put_range(http, url, b"\0" * 1000, 1000, len(data))
    assert resp.status == 308
    assert resp.headers["Range"] == "bytes=0-2999"
    # The same over chunked transfer encoding.
    status, headers, _ = await raw(
        proxy.port,
        "PUT /upload/inside.bin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Range: bytes 0-2999/{len(data)}\r\nConnection: close",
        chunked(b"\1" * 1000, b"\1" * 2000),
    )
    assert status == 308
    assert headers["range"] == "bytes=0-2999"
    resp = await put_range(http, url, data[3000:], 3000, len(data))
    assert resp.status == 200
    assert (await resp.json())["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, "inside.bin") == data


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
async def test_empty_chunked_body_stores_nothing(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/empty-chunk.bin"
    assert (await put_range(http, url, b"a" * 10, 0, 20)).status == 308
    status, headers, _ = await raw(
        proxy.port,
        "PUT /upload/empty-chunk.bin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        "Content-Range: bytes 10-19/20\r\nConnection: close",
        chunked(),
    )
    assert status == 308
    assert headers["range"] == "bytes=0-9"
    resp = await put_range(http, url, b"b" * 10, 10, 20)
    assert resp.status == 200
    assert await stored_object(store_harness, "empty-chunk.bin") == b"a" * 10 + b"b" * 10


@FS
async def test_content_length_zero_chunk_is_400_and_harmless(proxies, http) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/zero-cl.bin"
    assert (await put_range(http, url, b"a" * 10, 0, 20)).status == 308
    async with http.put(url, data=b"", headers={"Content-Range": "bytes 10-19/20"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "length_mismatch"
    resp = await probe(http, url)
    assert resp.headers["Range"] == "bytes=0-9"


@FS
@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_probe_with_a_body_is_400(proxies, http, framing) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/probe-body.bin"
    assert (await put_range(http, url, b"a" * 10, 0, 20)).status == 308
    if framing == "chunked":
        head, body = "Transfer-Encoding: chunked", chunked(b"b" * 10)
    else:
        head, body = "Content-Length: 10", b"b" * 10
    status, headers, answer = await raw(
        proxy.port,
        f"PUT /upload/probe-body.bin HTTP/1.1\r\nHost: x\r\n{head}\r\n"
        "Content-Range: bytes */*\r\nConnection: close",
        body,
    )
    assert_json_error(status, headers, answer, 400)
    resp = await probe(http, url)
    assert resp.headers["Range"] == "bytes=0-9"


@FS
async def test_chunk_request_without_any_body_is_400_and_creates_nothing(proxies, http) -> None:
    """No Content-Length and no chunked encoding means an empty body (RFC 9112
    6.3), which contradicts a range of 10 bytes: it is not a dropped connection."""
    proxy = await proxies.start()
    status, headers, body = await raw(
        proxy.port,
        "PUT /upload/no-body.bin HTTP/1.1\r\nHost: x\r\n"
        "Content-Range: bytes 0-9/10\r\nConnection: close",
    )
    doc = assert_json_error(status, headers, body, 400)
    assert doc["error"] == "length_mismatch"
    assert (await probe(http, f"{proxy.url}/upload/no-body.bin")).status == 404


# -- probes and totals ----------------------------------------------------------------------


@FS
async def test_probe_total_below_offset_of_open_total_upload_is_400(proxies, http) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/open-total.bin"
    assert (await put_range(http, url, b"a" * 100, 0, None)).status == 308
    async with http.put(url, headers={"Content-Range": "bytes */50"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "total_mismatch"
    resp = await probe(http, url, "150")
    assert resp.status == 308
    assert resp.headers["Range"] == "bytes=0-99"
    resp = await put_range(http, url, b"b" * 50, 100, 150)
    assert resp.status == 200
    assert (await resp.json())["size"] == 150


@FS
async def test_probe_zero_total_finalizes_empty_upload(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/empty-post.bin"
    async with http.post(url, headers={"X-Upload-Content-Length": "0"}) as resp:
        assert resp.status == 200
    resp = await probe(http, url)
    assert resp.status == 308
    assert "Range" not in resp.headers
    async with http.put(url, headers={"Content-Range": "bytes */0"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["crc32c"] == crc_b64(b"")
    assert await stored_object(store_harness, "empty-post.bin") == b""


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
async def test_finalizing_probe_checks_the_client_digest(proxies, http, store_harness) -> None:
    """``bytes */T`` can be the final request; an x-goog-hash on it is checked."""
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/probe-digest.bin"
    data = os.urandom(1000)
    assert (await put_range(http, url, data, 0, None)).status == 308
    async with http.put(url, headers={"Content-Range": f"bytes */{len(data)}",
                                      "x-goog-hash": f"crc32c={crc_b64(data + b'!')}"}) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"] == "digest_mismatch"


@FS
async def test_resumed_upload_has_right_crc_and_no_md5(proxies, http) -> None:
    proxy = await proxies.start(storage={"md5": True})
    url = f"{proxy.url}/upload/resumed-md5.bin"
    data = os.urandom(2 * MIB + 5)
    assert (await put_range(http, url, data[:MIB], 0, len(data))).status == 308
    # Resend with overlap, as a client does after a lost answer.
    resp = await put_range(http, url, data[MIB // 2:], MIB // 2, len(data))
    assert resp.status == 200
    doc = await resp.json()
    assert doc["crc32c"] == crc_b64(data)
    assert "md5Hash" not in doc


# -- replacing, cancelling, concurrency ---------------------------------------------------------


@FS
async def test_post_replaces_an_in_progress_upload(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/replaced.bin"
    assert (await put_range(http, url, b"old" * 100, 0, 1000)).status == 308
    async with http.post(url, headers={"X-Upload-Content-Length": "6"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["offset"] == 0
    resp = await probe(http, url)
    assert resp.status == 308
    assert "Range" not in resp.headers
    resp = await put_range(http, url, b"new!!!", 0, 6)
    assert resp.status == 200
    assert await stored_object(store_harness, "replaced.bin") == b"new!!!"


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
async def test_delete_of_completed_upload_keeps_the_object(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/done-delete.bin"
    assert (await put_range(http, url, b"done", 0, 4)).status == 200
    async with http.delete(url) as resp:
        assert resp.status == 204
    assert (await probe(http, url)).status == 404
    assert await stored_object(store_harness, "done-delete.bin") == b"done"


async def slow_body(data: bytes, piece: int, pause: float, sent: list[int]):
    for start in range(0, len(data), piece):
        yield data[start:start + piece]
        sent[0] += len(data[start:start + piece])
        await asyncio.sleep(pause)


@FS
@pytest.mark.parametrize("method", ["DELETE", "PROBE", "POST"])
async def test_request_during_an_active_stream_takes_over_in_time(
    proxies, http, store_harness, method
) -> None:
    """A client still streaming (not stalled) is taken over as well: the new
    request answers within takeover_timeout, and the stream's answer never
    acknowledges more than was stored."""
    proxy = await proxies.start(storage={"takeover_timeout": "3s"})
    url = f"{proxy.url}/upload/streaming.bin"
    data = os.urandom(64 * MIB)
    sent = [0]

    async def stream():
        try:
            async with http.put(url, data=slow_body(data, 64 * 1024, 0.002, sent),
                                allow_redirects=False,
                                headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}
                                ) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Range")
        except Exception as exc:  # the proxy may close the connection after answering
            return type(exc).__name__, None

    task = asyncio.create_task(stream())
    async with asyncio.timeout(10):
        while sent[0] < 2 * MIB:
            await asyncio.sleep(0.01)
    started = time.monotonic()
    if method == "DELETE":
        async with http.delete(url) as resp:
            status = resp.status
            text = await resp.text()
        assert status == 204, text
    elif method == "POST":
        async with http.post(url, headers={"X-Upload-Content-Length": "4"}) as resp:
            status = resp.status
            text = await resp.text()
        assert status == 200, text
    else:
        resp = await probe(http, url)
        assert resp.status == 308, resp.status
        assert int(resp.headers["Range"].rsplit("-", 1)[1]) + 1 >= MIB
    assert time.monotonic() - started < 3
    result = await asyncio.wait_for(task, 30)
    if method == "DELETE":
        assert (await probe(http, url)).status == 404
    elif method == "POST":
        resp = await probe(http, url)
        assert resp.status == 308
        assert "Range" not in resp.headers
        assert (await put_range(http, url, b"new!", 0, 4)).status == 200
        assert await stored_object(store_harness, "streaming.bin") == b"new!"
    else:
        assert result[0] in (308, "ClientOSError", "ServerDisconnectedError",
                             "ClientPayloadError"), result
        assert proxy.app[keys.WRITERS].takeovers >= 1


@FS
async def test_deeply_nested_initiation_body_is_400(proxies, http) -> None:
    proxy = await proxies.start()
    async with http.post(f"{proxy.url}/upload/nested.bin", data=b"[" * 60000,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"] == "bad_request"


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
@pytest.mark.parametrize("header", ["Content-Type", "X-Upload-Content-Type"])
async def test_non_ascii_content_type_is_not_a_server_error(proxies, store_harness, header) -> None:
    proxy = await proxies.start()
    method = "POST" if header.startswith("X-") else "PUT"
    status, _, body = await raw(
        proxy.port,
        f"{method} /upload/ctype.bin HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {3 if method == 'PUT' else 0}\r\n"
        f"{header}: text/caf\xe9\r\nConnection: close",
        b"abc" if method == "PUT" else b"",
    )
    assert status < 500, body


# -- several processes -----------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
async def test_stalled_writer_on_another_process_cannot_undo_a_completion(
    proxies, http, store_harness
) -> None:
    """The mobile case across processes: a half-open request stalls on proxy A,
    the client reconnects through proxy B, probes, resumes and completes. When A
    finally gives up on its stalled body, the completed upload must stay
    completed: A must not record its stale session over B's work."""
    stale = await proxies.start(server={"read_timeout": "1s"})
    fresh = await proxies.start()
    data = os.urandom(3000)
    url = f"{fresh.url}/upload/two-procs.bin"
    assert (await put_range(http, url, data[:1000], 0, len(data))).status == 308
    # "Expect: 100-continue": A answers "100 Continue" only once it has read the
    # upload's state and starts on the body, which tells the test A is writing.
    head = ("PUT /upload/two-procs.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n"
            f"Expect: 100-continue\r\nContent-Range: bytes 1000-2999/{len(data)}")
    sock = socket.create_connection(("127.0.0.1", stale.port))
    try:
        sock.sendall(head.encode() + b"\r\n\r\n")
        interim = await asyncio.to_thread(read_head, sock)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(data[1000:1500])
        await wait_until_server_read_all(sock)  # proxy A has the 500 bytes, waiting for more
        resp = await probe(http, url)
        assert resp.status == 308
        offset = int(resp.headers["Range"].rsplit("-", 1)[1]) + 1
        resp = await put_range(http, url, data[offset:], offset, len(data))
        assert resp.status == 200
        done = await resp.json()
        assert done["crc32c"] == crc_b64(data)
        # Proxy A's read timeout, with the connection still open: it persists
        # what it had and lets the upload go.
        async with asyncio.timeout(30):
            while stale.app[keys.WRITERS].is_held("two-procs.bin"):
                await asyncio.sleep(0.02)
    finally:
        sock.close()
    async with asyncio.timeout(10):
        while stale.app[keys.WRITERS].active:
            await asyncio.sleep(0.05)
    for proxy in (fresh, stale):
        async with http.put(f"{proxy.url}/upload/two-procs.bin",
                            headers={"Content-Range": "bytes */*"}) as resp:
            assert resp.status == 200, (resp.status, resp.headers.get("Range"))
            assert await resp.json() == done
    assert await stored_object(store_harness, "two-procs.bin") == data


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
async def test_ragged_resumes_across_processes_keep_bytes_and_crc(
    proxies, http, store_harness
) -> None:
    """Chunks of odd sizes, resent with overlaps, alternating between two
    processes, with open and then stated totals: bytes and CRC32C stay right."""
    procs = [await proxies.start(), await proxies.start()]
    data = os.urandom(13 * MIB + 4321)
    url = "/upload/ragged/file.bin"
    offset = 0
    sizes = [256 * 1024, 3 * MIB + 1, 1, 5 * MIB - 7, 700 * 1024, 2 * MIB + 3]
    turn = 0
    while offset < len(data):
        start = max(0, offset - (turn * 7919) % (300 * 1024))  # resend some old bytes
        end = min(len(data), start + sizes[turn % len(sizes)])
        total = len(data) if end == len(data) or turn > 4 else None
        base = procs[turn % 2].url
        resp = await put_range(http, base + url, data[start:end], start, total)
        if end == len(data):
            assert resp.status == 200, resp.status
            doc = await resp.json()
            assert doc["crc32c"] == crc_b64(data)
            assert doc["size"] == len(data)
            break
        assert resp.status == 308, resp.status
        assert resp.headers["Range"] == f"bytes=0-{max(offset, end) - 1}"
        offset = max(offset, end)
        turn += 1
    assert await stored_object(store_harness, "ragged/file.bin") == data
