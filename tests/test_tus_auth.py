"""tus behind the auth webhook: owner binding, what the webhook is told, and
the completion callback, with a real fake main service."""

from __future__ import annotations

import json
import os

from app.http import keys
from tests import test_http_auth
from tests.test_http_auth import (
    T1,
    T2,
    auth_config,
    callbacks_config,
    eventually,
    eventually_async,
)
from tests.test_tus import OCTETS, TUS, head, meta, session_of

proxies = test_http_auth.proxies
main = test_http_auth.main

MIB = 1024 * 1024


async def test_another_owner_cannot_head_patch_or_delete(main, proxies, http) -> None:
    proxy = await proxies.start(auth=auth_config(main.auth_url))
    data = os.urandom(MIB + 7)
    headers = {**TUS, **T1, "Upload-Length": str(len(data)),
               "Upload-Metadata": meta(filename="mine.bin")}
    async with http.post(f"{proxy.url}/files/", headers=headers) as resp:
        assert resp.status == 201
        url = resp.headers["Location"]
    async with http.patch(url, data=data[:MIB],
                          headers={**OCTETS, **T1, "Upload-Offset": "0"}) as resp:
        assert resp.status == 204

    assert (await head(http, url, **T2)).status == 403
    async with http.patch(url, data=data[MIB:],
                          headers={**OCTETS, **T2, "Upload-Offset": str(MIB)}) as resp:
        assert resp.status == 403
        assert resp.headers["Tus-Resumable"] == "1.0.0"
    async with http.delete(url, headers={**TUS, **T2}) as resp:
        assert resp.status == 403
    async with http.post(url, headers={**TUS, **T2, "X-HTTP-Method-Override": "DELETE"}) as resp:
        assert resp.status == 403
    # Nor may u2 join u1's partial upload into an object of its own.
    async with http.post(f"{proxy.url}/files/", headers={
        **TUS, **T1, "Upload-Length": "3", "Upload-Concat": "partial"}) as resp:
        partial = resp.headers["Location"]
    async with http.patch(partial, data=b"abc",
                          headers={**OCTETS, **T1, "Upload-Offset": "0"}) as resp:
        assert resp.status == 204
    async with http.post(f"{proxy.url}/files/", headers={
        **TUS, **T2, "Upload-Concat": f"final;{partial}"}) as resp:
        assert resp.status == 403
    # No token: the webhook refuses before any body byte is stored.
    async with http.patch(url, data=data[MIB:],
                          headers={**OCTETS, "Upload-Offset": str(MIB)}) as resp:
        assert resp.status == 401

    state = await head(http, url, **T1)
    assert state.status == 200 and state.headers["Upload-Offset"] == str(MIB)
    actions = [(c["action"], c["dialect"], c["name"]) for c in main.auth_calls]
    assert actions[:3] == [("create", "tus", "tus/mine.bin"), ("append", "tus", "tus/mine.bin"),
                           ("status", "tus", "tus/mine.bin")]
    # A partial upload is authorized under the hidden name its bytes go to.
    assert ("create", "tus", ".tus-partials/" + partial.rsplit("/", 1)[1]) in actions


async def not_pending(store: object, session: str) -> bool:
    return not (await store.get(session)).notify_pending  # type: ignore[attr-defined]


async def probe_tus(http: object, url: str) -> None:
    async with http.head(url, headers={**TUS, **T1}) as resp:  # type: ignore[attr-defined]
        assert resp.status == 200


async def test_completion_callback_names_the_object(main, proxies, http, store_harness) -> None:
    proxy = await proxies.start(auth=auth_config(main.auth_url),
                                callbacks=callbacks_config(main.callback_url))
    data = os.urandom(5000)
    headers = {**OCTETS, **T1, "Upload-Length": str(len(data)),
               "Upload-Metadata": meta(filename="cb/done.bin")}
    async with http.post(f"{proxy.url}/files/", data=data, headers=headers) as resp:
        assert resp.status == 201 and resp.headers["Upload-Offset"] == str(len(data))
    await eventually(lambda: main.answered == [200])
    payload = json.loads(main.callbacks[0][1])
    assert payload["name"] == "tus/cb/done.bin"
    # Delivered: the intent in the id session's own record is cleared, so no
    # later start-up, cleanup or repeat request sends it again.
    store = proxy.app[keys.STORE]
    session = session_of(resp.headers["Location"])
    await eventually_async(lambda: not_pending(store, session))
    await probe_tus(http, resp.headers["Location"])
    assert main.answered == [200]
    assert payload["owner"] == "u1" and payload["size"] == len(data)
    assert payload["metadata"] == {"filename": "cb/done.bin", "user": "42"}


async def test_a_joined_upload_calls_back_once_for_its_object(main, proxies, http) -> None:
    proxy = await proxies.start(auth=auth_config(main.auth_url),
                                callbacks=callbacks_config(main.callback_url))
    urls = []
    for piece in (os.urandom(5 * MIB), b"tail"):
        headers = {**OCTETS, **T1, "Upload-Length": str(len(piece)), "Upload-Concat": "partial"}
        async with http.post(f"{proxy.url}/files/", data=piece, headers=headers) as resp:
            assert resp.status == 201
            urls.append(resp.headers["Location"])
    await eventually(lambda: len(main.answered) == 2)
    headers = {**TUS, **T1, "Upload-Concat": "final;" + " ".join(urls),
               "Upload-Metadata": meta(filename="joined/all.bin")}
    async with http.post(f"{proxy.url}/files/", headers=headers) as resp:
        assert resp.status == 201
    await eventually(lambda: len(main.answered) == 3)
    partials, final = main.callbacks[:2], json.loads(main.callbacks[2][1])
    assert all(json.loads(raw)["metadata"]["tus-concat"] == "partial" for _, raw in partials)
    assert final["name"] == "tus/joined/all.bin" and final["size"] == 5 * MIB + 4
    assert final["owner"] == "u1"
