"""The auth webhook and completion callbacks for IETF-draft uploads: asked on
every request with the object's name before any body byte, the object named
by the webhook, owner binding across HEAD, PATCH and DELETE."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
from aiohttp import web

from tests import test_http, test_http_auth
from tests.ietf_client import Connection, Exchange, path_of
from tests.test_http import crc_b64, stored_object
from tests.test_http_auth import OWNERS, T1, T2, auth_config, callbacks_config, eventually
from tests.test_ietf import call

proxies = test_http.proxies
main = test_http_auth.main

FS = pytest.mark.parametrize("store_kind", ["filesystem"])


def v8(**headers: str) -> dict[str, str]:
    return {"Upload-Draft-Interop-Version": "8", **headers}


PATCH = {"Content-Type": "application/partial-upload"}


async def test_owner_binding_across_head_patch_delete(proxies, main, store_harness) -> None:
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    data = os.urandom(4000)
    created = (await call(proxy.port, "POST", "/files/", v8(**{
        "Upload-Complete": "?0", "Upload-Length": "4000",
        "Content-Disposition": 'attachment; filename="../../etc/passwd"', **T1}),
        data[:1000])).final
    assert created.status == 201
    path = path_of(created.headers["location"])
    # The file name is kept without its path, under tus.prefix.
    assert main.auth_calls[-1]["name"] == "tus/passwd"

    for method, headers, body in (
        ("HEAD", {}, b""),
        ("PATCH", {**PATCH, "Upload-Offset": "1000", "Upload-Complete": "?1"}, data[1000:]),
        ("DELETE", {}, b""),
    ):
        refused = (await call(proxy.port, method, path, v8(**headers, **T2), body)).final
        assert refused.status == 403, (method, refused.body)
        if method != "HEAD":
            assert refused.json()["code"] == "forbidden"
        unknown = (await call(proxy.port, method, path, v8(**headers), body)).final
        assert unknown.status == 401, method
    head = (await call(proxy.port, "HEAD", path, v8(**T1))).final
    assert head.headers["upload-offset"] == "1000"

    done = (await call(proxy.port, "PATCH", path, v8(**PATCH, **T1, **{
        "Upload-Offset": "1000", "Upload-Complete": "?1"}), data[1000:])).final
    assert done.status == 200
    assert done.json()["metadata"] == {"user": "42"}
    assert await stored_object(store_harness, "tus/passwd") == data
    calls = [(c["action"], c["dialect"], c["name"]) for c in main.auth_calls]
    assert {name for _, _, name in calls} == {"tus/passwd"}
    assert {dialect for _, dialect, _ in calls} == {"ietf"}
    assert [a for a, _, _ in calls if a != "status"][:1] == ["create"]
    assert {a for a, _, _ in calls} == {"create", "status", "append", "cancel"}
    assert (await call(proxy.port, "DELETE", path, v8(**T1))).final.status == 204


@FS
async def test_webhook_names_the_object_and_callback_tells_it(proxies, main, store_harness) -> None:
    async def named(document: dict[str, Any]) -> web.StreamResponse:
        owner = OWNERS.get(document["headers"].get("Authorization", ""))
        if owner is None:
            return web.json_response({"message": "unknown token"}, status=401)
        return web.json_response({"owner": owner, "name": f"users/{owner}/upload.bin"})

    main.auth = named
    proxy = await proxies.start(auth=auth_config(main.auth_url),
                                callbacks=callbacks_config(main.callback_url))
    data = os.urandom(5000)
    refused = (await call(proxy.port, "POST", "/files/", v8(**{"Upload-Complete": "?1"}),
                          data)).final
    assert refused.status == 401
    assert refused.headers["content-type"].startswith("application/problem+json")
    exchange = await call(proxy.port, "POST", "/files/", v8(**{
        "Upload-Complete": "?1", "Content-Disposition": 'inline; filename="ignored.bin"',
        **T2}), data)
    assert [r.status for r in exchange.interim] == [104]
    doc = exchange.final.json()
    assert doc["name"] == "users/u2/upload.bin"
    assert await stored_object(store_harness, "users/u2/upload.bin") == data
    await eventually(lambda: bool(main.callbacks))
    payload = json.loads(main.callbacks[0][1])
    assert (payload["name"], payload["owner"], payload["crc32c"]) == (
        "users/u2/upload.bin", "u2", crc_b64(data))


@FS
async def test_refused_creation_gets_no_104_nor_100(proxies, main) -> None:
    """The webhook answers before the 104: a client that waits for ``100
    Continue`` learns it is refused without sending a byte of its body."""
    proxy = await proxies.start(auth=auth_config(main.auth_url))

    def exchange() -> Exchange:
        conn = Connection(proxy.port)
        try:
            conn.send_head("POST", "/files/", v8(**{
                "Upload-Complete": "?1", "Content-Length": "5", "Expect": "100-continue"}))
            return conn.read_final(Exchange())
        finally:
            conn.close()

    refused = await asyncio.to_thread(exchange)
    assert refused.interim == []
    assert refused.final.status == 401
    allowed = await call(proxy.port, "POST", "/files/", v8(**{
        "Upload-Complete": "?1", "Expect": "100-continue", **T1}), b"hello")
    assert [r.status for r in allowed.interim] == [104, 100]
    assert allowed.final.status == 200
