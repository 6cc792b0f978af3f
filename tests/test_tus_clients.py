"""Real tus clients, unmodified, against the proxy on both stores: tuspy and
tus-js-client (under Node), each through a relay that cuts one connection
mid-body at a byte count, resumed by the client itself."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from pathlib import Path

import pytest

from app.core.protocol import id_session_name
from app.http import keys
from tests.cut_relay import CuttingRelay
from tests.node_support import node_packages
from tests.test_http import proxies, stored_object  # noqa: F401

MIB = 1024 * 1024


def tuspy_upload(endpoint: str, data: bytes, chunk_size: int) -> str:
    from tusclient import client

    uploader = client.TusClient(endpoint).uploader(
        file_stream=io.BytesIO(data), chunk_size=chunk_size,
        metadata={"filename": "tuspy/big.bin", "filetype": "application/x-test"},
        retries=3, retry_delay=0, upload_checksum=True,
    )
    uploader.upload()
    return str(uploader.url)


def kept_after_cut(caplog: pytest.LogCaptureFixture) -> list[int]:
    """New bytes the engine kept from bodies that were cut (from its log)."""
    found = []
    for record in caplog.records:
        match = re.search(r"body interrupted after (\d+) new bytes", record.getMessage())
        if match:
            found.append(int(match.group(1)))
    return found


async def test_tuspy_with_checksums_resumes_after_a_cut(proxies, store_harness,  # noqa: F811
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.engine")
    pytest.importorskip("tusclient")
    proxy = await proxies.start()
    data = os.urandom(24 * MIB)
    # Mid-way through the second 8 MiB PATCH (headers are a few hundred bytes).
    async with CuttingRelay(proxy.port, cut_after=12 * MIB) as relay:
        url = await asyncio.to_thread(tuspy_upload, f"{relay.url}/files/", data, 8 * MIB)
    assert relay.cuts == 1
    # With a checksum none of the cut PATCH counted; tuspy resent it whole.
    assert any("a checked body stopped early" in r.getMessage() for r in caplog.records)
    assert kept_after_cut(caplog) == []
    assert await stored_object(store_harness, "tus/tuspy/big.bin") == data
    info = await proxy.app[keys.STORE].get(id_session_name("tus", url.rsplit("/", 1)[1]))
    assert info.completed is not None and info.content_type == "application/x-test"


# -- tus-js-client ------------------------------------------------------------

NODE_SCRIPT = r"""
const fs = require('fs');
const tus = require('tus-js-client');
const args = JSON.parse(process.argv[2]);
const upload = new tus.Upload(fs.readFileSync(args.file), {
  ...args.options,
  endpoint: args.endpoint,
  protocol: 'tus-v1',
  retryDelays: [0, 50, 100, 200],
  onSuccess: () => { console.log(JSON.stringify({ url: upload.url })); },
  onError: (err) => { console.error('upload failed: ' + err); process.exit(1); },
});
upload.start();
"""


@pytest.fixture(scope="module")
def tus_js() -> Path:
    root = node_packages("tus-js-client@4")
    (root / "tus_upload.js").write_text(NODE_SCRIPT)
    return root


async def run_tus_js(root: Path, endpoint: str, file: Path, **options: object) -> str:
    args = json.dumps({"endpoint": endpoint, "file": str(file), "options": options})
    node = await asyncio.create_subprocess_exec(
        "node", "tus_upload.js", args, cwd=root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await node.communicate()
    assert node.returncode == 0, err.decode()
    return str(json.loads(out.decode().strip().splitlines()[-1])["url"])


JS_CASES = {
    # One PATCH of the whole file, cut a third of the way in.
    "cut": ({}, 10 * MIB, 3 * MIB),
    # Deferred length: 3 MiB chunks, the last PATCH states Upload-Length.
    "deferred": ({"uploadLengthDeferred": True, "chunkSize": 3 * MIB}, 10 * MIB, 4 * MIB),
    # The first 2 MiB go with the POST that creates the upload; the cut falls
    # in the PATCH after it.
    "with-upload": ({"uploadDataDuringCreation": True, "chunkSize": 2 * MIB}, 6 * MIB, 3 * MIB),
    # Four partial uploads of 6 MiB at once (concatenation, joined in the
    # store); the one whose connection carries byte 13 MiB of the traffic is
    # cut and resumes on its own.
    "parallel": ({"parallelUploads": 4}, 24 * MIB, 13 * MIB),
}


@pytest.mark.parametrize("case", list(JS_CASES))
async def test_tus_js_client(proxies, store_harness, tus_js: Path, tmp_path: Path,  # noqa: F811
                             case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.engine")
    options, size, cut_after = JS_CASES[case]
    proxy = await proxies.start()
    data = os.urandom(size)
    source = tmp_path / "movie.bin"
    source.write_bytes(data)
    metadata = {"filename": f"js/{case}.bin", "filetype": "video/mp4"}
    async with CuttingRelay(proxy.port, cut_after=cut_after) as relay:
        url = await run_tus_js(tus_js, f"{relay.url}/files/", source,
                               metadata=metadata, **options)
    assert relay.cuts == 1
    # The cut PATCH's bytes that reached the server were kept, and the client
    # resumed after them.
    kept = kept_after_cut(caplog)
    assert len(kept) == 1 and kept[0] > 0
    assert url.startswith(f"{relay.url}/files/")
    assert await stored_object(store_harness, f"tus/js/{case}.bin") == data
    info = await proxy.app[keys.STORE].get(id_session_name("tus", url.rsplit("/", 1)[1]))
    assert info.completed is not None and info.completed.size == size
    if case == "parallel":
        assert info.metadata["tus-concat"].startswith("final;")
        assert len(info.metadata["tus-concat"].split()) == 4
        assert any("joined in the store" in r.getMessage() for r in caplog.records)
