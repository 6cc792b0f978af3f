"""Promises the README makes that ordinary conditions used to break (issue 9):
each test here failed on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from app.callbacks.intents import notifier_for
from app.callbacks.notifier import CALLBACK_ID_HEADER
from app.config import config_from_mapping
from app.http import keys
from app.ops.cleanup import run_cleanup
from tests import test_http
from tests.instances import AppProcess, s3_env
from tests.s3_faults import Rule, S3FaultProxy
from tests.test_http import crc_b64, put_range, stored_object
from tests.test_http_auth import (
    T1,
    T2,
    auth_config,
    callbacks_config,
    eventually,
    eventually_async,
    main,
    owner_by_token,
    probe_as,
)

proxies = test_http.proxies
__all__ = ["main"]  # the fake main application's fixture, shared with test_http_auth

MIB = 1024 * 1024
BOTH = pytest.mark.parametrize("store_kind", ["filesystem", "s3"])


@BOTH
async def test_a_completed_upload_refuses_a_contradicting_digest(
    proxies, http, store_harness
) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/done-digest.bin"
    data = os.urandom(3000)
    resp = await put_range(http, url, data, 0, len(data))
    assert resp.status == 200
    other = os.urandom(3000)
    # A client with other bytes, resending its last chunk with its own digest.
    async with http.put(url, data=other, headers={
        "Content-Range": f"bytes 0-{len(other) - 1}/{len(other)}",
        "x-goog-hash": f"crc32c={crc_b64(other)}",
    }) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"] == "digest_mismatch"
    # A probe that states a digest is checked the same way.
    async with http.put(url, headers={"Content-Range": f"bytes */{len(data)}",
                                      "x-goog-hash": f"crc32c={crc_b64(other)}"}) as resp:
        assert resp.status == 400
    # The right digest still gets the object's answer, and the object is unchanged.
    async with http.put(url, headers={"Content-Range": f"bytes */{len(data)}",
                                      "x-goog-hash": f"crc32c={crc_b64(data)}"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, "done-digest.bin") == data


FS = pytest.mark.parametrize("store_kind", ["filesystem"])


@FS
async def test_a_slow_webhook_is_not_an_outage(proxies, main) -> None:
    """400 probes at once against a healthy webhook that takes 1.5 s each:
    they queue for webhook connections, none fails as if it were down."""
    answered = asyncio.Event()

    async def slow(document: dict[str, Any]) -> web.StreamResponse:
        answered.set()
        await asyncio.sleep(1.5)  # the webhook's own latency, not a race
        return web.json_response({})

    main.auth = slow
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    url = f"{proxy.url}/upload/busy.bin"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        async def one() -> int:
            async with client.put(url, headers={"Content-Range": "bytes */*"},
                                  allow_redirects=False) as resp:
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(400)))
    assert answered.is_set()
    assert statuses.count(503) == 0, sorted(set(statuses))
    assert set(statuses) == {404}


@FS
async def test_a_hung_callback_receiver_cannot_delay_authorization(proxies, http, main) -> None:
    main.gate = asyncio.Event()  # the receiver accepts callbacks and never answers
    proxy = await proxies.start(auth=auth_config(main.auth_url, timeout="3s"),
                                callbacks=callbacks_config(main.callback_url, timeout="30s"))
    try:
        for i in range(110):
            async with http.put(f"{proxy.url}/upload/cb/{i}.bin", data=b"x", headers=T1) as r:
                assert r.status == 200
        # Every callback connection is taken by a hung delivery now.
        await eventually(lambda: len(main.callbacks) >= 32)
        async with asyncio.timeout(3):
            resp = await probe_as(http, f"{proxy.url}/upload/cb/0.bin", T1, "1")
        assert resp.status == 200
    finally:
        main.gate.set()


@BOTH
async def test_refused_probes_cost_a_running_upload_nothing(proxies, http, main) -> None:
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    writers = proxy.app[keys.WRITERS]
    name = "owned/a.bin"
    url = f"{proxy.url}/upload/{name}"
    data = os.urandom(2 * MIB)
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield data[:MIB]
        await release.wait()
        yield data[MIB:]

    upload = asyncio.create_task(http.put(url, data=body(), headers={
        **T1, "Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"}))
    await eventually(lambda: writers.is_held(name))
    for _ in range(20):
        assert (await probe_as(http, url, T2)).status == 403
    release.set()
    resp = await upload
    assert resp.status == 200, await resp.text()
    assert writers.takeovers == 0
    assert (await resp.json())["crc32c"] == crc_b64(data)


def swap_for_symlink(root: str, folder: str, target: str) -> None:
    root = os.path.realpath(root)
    shutil.rmtree(os.path.join(root, folder))
    os.symlink(target, os.path.join(root, folder), target_is_directory=True)


@FS
async def test_a_store_folder_swapped_for_a_symlink_answers_503(
    proxies, http, store_harness, tmp_path, caplog
) -> None:
    proxy = await proxies.start()
    outside = str(tmp_path / "elsewhere")
    os.mkdir(outside)
    swap_for_symlink(store_harness.storage.filesystem.root, ".uploads/data", outside)
    async with http.put(f"{proxy.url}/upload/x.bin", data=b"hello") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "storage_unavailable"
    assert os.listdir(outside) == []
    assert "'.uploads/data'" in caplog.text and "symbolic link" in caplog.text


# -- lost completion callbacks -------------------------------------------------

S3 = pytest.mark.parametrize("store_kind", ["s3"])
#: The completion's record write: a session record PUT that marks it completed.
COMPLETION_WRITE = Rule("PUT", "/.uploads/sessions/", b'"completed":{')


def s3_via(fault: S3FaultProxy) -> dict[str, Any]:
    return {"s3": {"endpoint_url": fault.url, "max_attempts": 2}}


@S3
async def test_a_failing_outbox_write_neither_fails_the_upload_nor_loses_its_callback(
    proxies, http, main, moto_endpoint
) -> None:
    async with S3FaultProxy(moto_endpoint) as fault:
        outbox = fault.add(Rule("PUT", "/.uploads/callbacks/"))
        proxy = await proxies.start(storage=s3_via(fault),
                                    callbacks=callbacks_config(main.callback_url))
        url = f"{proxy.url}/upload/cb/outbox-down.bin"
        data = os.urandom(3000)
        resp = await put_range(http, url, data, 0, len(data))
        assert resp.status == 200, await resp.text()
        await eventually(lambda: main.answered == [200])
        _, raw = main.callbacks[0]
        assert json.loads(raw)["crc32c"] == crc_b64(data)
        # A repeat request finds nothing owed and sends nothing again.
        resp = await put_range(http, url, data, 0, len(data))
        assert resp.status == 200
        assert len(main.callbacks) == 1
        assert outbox.hits == 0  # the session record holds the intent, not the outbox


async def owed_names(harness: Any) -> list[str]:
    store = await harness.open()
    return [i.name async for i in store.list_completed() if i.notify_pending] + [
        i.name async for i in store.list_unfinished() if i.notify_pending]


@S3
@pytest.mark.parametrize("recovery", ["retry", "restart", "cleanup"])
async def test_a_failing_completion_write_loses_no_callback(
    proxies, http, main, moto_endpoint, store_harness, recovery
) -> None:
    async with S3FaultProxy(moto_endpoint) as fault:
        rule = fault.add(COMPLETION_WRITE)
        callbacks = callbacks_config(main.callback_url)
        proxy = await proxies.start(storage=s3_via(fault), callbacks=callbacks)
        name = f"cb/completion-{recovery}.bin"
        url = f"{proxy.url}/upload/{name}"
        data = os.urandom(3000)
        resp = await put_range(http, url, data, 0, len(data))
        # The object is complete in S3, but its record could not say so.
        assert resp.status == 503, await resp.text()
        assert rule.hits >= 2  # every attempt failed, not only the first
        assert main.callbacks == []
        assert await owed_names(store_harness) == [name]
        fault.rules.clear()
        if recovery == "retry":
            resp = await put_range(http, url, data, 0, len(data))
            assert resp.status == 200
        elif recovery == "restart":
            await proxy.stop()
            await proxies.start(storage=s3_via(fault), callbacks=callbacks)
        else:
            await proxy.stop()
            store = await store_harness.open()
            async with aiohttp.ClientSession() as session:
                notifier = notifier_for(
                    config_from_mapping({"callbacks": callbacks}).callbacks, store, session
                )
                # Hours later: the interrupted completion counts as stale, and
                # still must be finished, never aborted.
                report = await run_cleanup(store, older_than=3600, now=time.time() + 7200,
                                           notifier=notifier)
            assert report.aborted == 0
            assert (report.callbacks_delivered, report.callbacks_pending) == (1, 0)
        await eventually(lambda: main.answered == [200])
        payload = json.loads(main.callbacks[0][1])
        assert (payload["name"], payload["size"]) == (name, len(data))
        assert await stored_object(store_harness, name) == data
        await eventually_async(lambda: _nothing_owed(store_harness))


async def _nothing_owed(harness: Any) -> bool:
    return await owed_names(harness) == []


@BOTH
async def test_a_callback_that_failed_is_sent_again_on_a_repeat_request(
    proxies, http, main, store_harness
) -> None:
    main.callback_statuses = [500, 500]
    proxy = await proxies.start(callbacks=callbacks_config(main.callback_url, max_attempts=2))
    url = f"{proxy.url}/upload/cb/again.bin"
    data = os.urandom(1000)
    resp = await put_range(http, url, data, 0, len(data))
    assert resp.status == 200
    await eventually(lambda: main.answered == [500, 500])
    assert await owed_names(store_harness) == ["cb/again.bin"]
    async with http.put(url, headers={"Content-Range": "bytes */*"}) as probe:
        assert probe.status == 200
    await eventually(lambda: main.answered == [500, 500, 200])
    ids = {headers[CALLBACK_ID_HEADER] for headers, _ in main.callbacks}
    assert len(ids) == 1
    await eventually_async(lambda: _nothing_owed(store_harness))


@BOTH
async def test_replacing_an_upload_whose_callback_is_owed_keeps_the_callback(
    proxies, http, main, store_harness
) -> None:
    main.callback_statuses = [500, 500]
    callbacks = callbacks_config(main.callback_url, max_attempts=2)
    proxy = await proxies.start(callbacks=callbacks)
    url = f"{proxy.url}/upload/cb/replaced.bin"
    async with http.put(url, data=b"first") as resp:
        assert resp.status == 200
    await eventually(lambda: main.answered == [500, 500])
    async with http.put(url, data=b"second") as resp:
        assert resp.status == 200
    # The first upload's callback went to the outbox before its record was
    # replaced, and was sent from there.
    await eventually(lambda: main.answered.count(200) == 2)
    assert {json.loads(raw)["size"] for _, raw in main.callbacks} == {5, 6}
    assert len({headers[CALLBACK_ID_HEADER] for headers, _ in main.callbacks}) == 2


@pytest.mark.parametrize("held", ["complete_multipart_upload", "completion_record"])
async def test_kill_9_while_completing_loses_no_callback(
    http, main, moto_endpoint, bucket, tmp_path, held
) -> None:
    log_path = str(tmp_path / "server.log")
    async with S3FaultProxy(moto_endpoint) as fault:
        rule = fault.add(Rule("POST", "uploadId=") if held == "complete_multipart_upload"
                         else COMPLETION_WRITE)
        rule.action = "hold"
        # The restarted instance waits for the killed one's lease to run out.
        lease = {"APP__STORAGE__LEASE_TTL": "2s"}
        first = AppProcess(s3_env(fault.url, bucket, main.callback_url, **lease), log_path)
        second = AppProcess(s3_env(moto_endpoint, bucket, main.callback_url, **lease), log_path)
        try:
            await first.start(http)
            data = os.urandom(3000)
            upload = asyncio.create_task(
                http.put(f"{first.url}/upload/killed/at-{held}.bin", data=data))
            async with asyncio.timeout(30):
                await rule.holding.wait()
            await first.kill()  # kill -9 while the write is held at the proxy
            with pytest.raises(aiohttp.ClientError):
                await upload
            assert main.callbacks == []
            await second.start(http)
            await eventually(lambda: main.answered == [200], timeout=30)
            payload = json.loads(main.callbacks[0][1])
            assert (payload["name"], payload["size"]) == (f"killed/at-{held}.bin", len(data))
            assert payload["crc32c"] == crc_b64(data)
            async with http.put(f"{second.url}/upload/killed/at-{held}.bin",
                                headers={"Content-Range": "bytes */*"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["crc32c"] == crc_b64(data)
        finally:
            await first.kill()
            await second.kill()


# -- ownership outlives the session record -------------------------------------

T3 = {"Authorization": "Bearer t3"}  # u2 again, and the webhook lets it replace


async def owners_with_replace(document: dict[str, Any]) -> web.StreamResponse:
    token = document["headers"].get("Authorization", "")
    if token == T3["Authorization"]:
        return web.json_response({"owner": "u2", "allow_replace": True})
    return await owner_by_token(document)


async def forget_completed_records(harness: Any) -> None:
    store = await harness.open()
    report = await run_cleanup(store, older_than=3600, now=time.time() + 7200)
    assert report.forgotten >= 1


@BOTH
@pytest.mark.parametrize("record_gone_by", ["cleanup", "delete"])
async def test_another_owner_cannot_replace_an_object_once_its_record_is_gone(
    proxies, http, main, store_harness, record_gone_by
) -> None:
    main.auth = owners_with_replace
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    name = f"owned/{record_gone_by}.bin"
    url = f"{proxy.url}/upload/{name}"
    async with http.put(url, data=b"A's object", headers=T1) as resp:
        assert resp.status == 200
    if record_gone_by == "cleanup":
        await forget_completed_records(store_harness)
    else:
        async with http.delete(url, headers=T1) as resp:
            assert resp.status == 204
    async with http.put(url, headers={"Content-Range": "bytes */*", **T1}) as resp:
        assert resp.status == 404  # the record is gone indeed
    # Every way of starting over is refused for another owner...
    async with http.put(url, data=b"B's object", headers=T2) as resp:
        assert resp.status == 403, await resp.text()
    assert (await put_range(http, url, b"B's", 0, 3, **T2)).status == 403
    async with http.post(url, headers={"X-Upload-Content-Length": "3", **T2}) as resp:
        assert resp.status == 403
    assert await stored_object(store_harness, name) == b"A's object"
    # ...allowed for the same owner...
    async with http.put(url, data=b"A again", headers=T1) as resp:
        assert resp.status == 200
    assert await stored_object(store_harness, name) == b"A again"
    # ...and for another one when the webhook says it may replace.
    async with http.put(url, data=b"B, allowed", headers=T3) as resp:
        assert resp.status == 200
    assert await stored_object(store_harness, name) == b"B, allowed"
    async with http.delete(url, headers=T3) as resp:
        assert resp.status == 204
    async with http.put(url, data=b"A once more", headers=T1) as resp:
        assert resp.status == 403  # now the object is u2's


# -- refused bodies are not read ---------------------------------------------------


class CountingRelay:
    """A TCP relay between a client and the server that counts the body bytes
    it could hand to the server. Its socket to the server has a small send
    buffer, so what it counts is close to what the server actually read."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.to_server = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CountingRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.target_port))
        ureader, uwriter = await asyncio.open_connection(sock=sock)
        uwriter.transport.set_write_buffer_limits(high=16 * 1024)

        async def up() -> None:
            while data := await creader.read(16 * 1024):
                uwriter.write(data)
                await uwriter.drain()
                self.to_server += len(data)

        async def down() -> None:
            while data := await ureader.read(65536):
                cwriter.write(data)
                await cwriter.drain()
            cwriter.write_eof()

        await asyncio.gather(up(), down(), return_exceptions=True)
        for w in (uwriter, cwriter):
            w.close()


async def blast(port: int, head: bytes, limit: int) -> tuple[bytes, int]:
    """Send ``head`` and then body bytes as fast as the connection takes them
    (up to ``limit``), reading the answer meanwhile; (answer, bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    chunk = b"\0" * 65536

    async def send() -> None:
        nonlocal sent
        writer.write(head)
        while sent < limit:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    async def receive() -> bytes:
        answer = bytearray()
        while data := await reader.read(65536):
            answer += data
        return bytes(answer)

    sender = asyncio.create_task(send())
    try:
        answer = await receive()
    except ConnectionError:
        answer = b""
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    writer.close()
    return answer, sent


@FS
@pytest.mark.parametrize("refusal", ["webhook_403", "too_large"])
async def test_a_refused_body_is_not_read(proxies, main, refusal) -> None:
    async def refuse(document: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"message": "go away"}, status=403)

    main.auth = refuse if refusal == "webhook_403" else owner_by_token
    proxy = await proxies.start(auth=auth_config(main.auth_url),
                                storage={"max_upload_size": 1000})
    port = int(proxy.url.rsplit(":", 1)[1])
    head = (b"PUT /upload/refused.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t1\r\n"
            b"Content-Length: 1073741824\r\n\r\n")
    async with CountingRelay(port) as relay:
        answer, sent = await blast(relay.port, head, limit=512 * MIB)
    assert relay.to_server < MIB, (relay.to_server, sent)
    status = {"webhook_403": b"403", "too_large": b"413"}[refusal]
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"connection: close" in answer.lower()
