"""Promises the README makes that ordinary conditions used to break (issue 9):
each test here failed on the code before its fix."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from app.http import keys
from tests import test_http
from tests.test_http import crc_b64, put_range, stored_object
from tests.test_http_auth import T1, T2, auth_config, callbacks_config, eventually, main, probe_as

proxies = test_http.proxies
http = test_http.http
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
