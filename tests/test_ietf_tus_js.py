"""tus-js-client, unmodified, in its IETF-draft modes (``ietf-draft-03`` sends
interop 5, ``ietf-draft-05`` interop 6), its connection cut mid-body by a relay
at a byte count, resuming by HEAD and PATCH."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests import test_http
from tests.cut_relay import CuttingRelay
from tests.node_support import node_packages
from tests.test_http import crc_b64, stored_object

proxies = test_http.proxies

MIB = 1024 * 1024

SCRIPT = r"""
const tus = require('tus-js-client');
const fs = require('fs');
const [endpoint, file, protocol, chunkSize, withData] = process.argv.slice(2);
const seen = [];
const upload = new tus.Upload(fs.readFileSync(file), {
  endpoint, protocol,
  chunkSize: chunkSize === 'all' ? Infinity : Number(chunkSize),
  retryDelays: [0, 50, 200, 500, 1000],
  uploadDataDuringCreation: withData === 'yes',
  headers: {'Content-Disposition': 'inline; filename="from-node.bin"'},
  onAfterResponse(req, res) {
    seen.push([req.getMethod(), res.getStatus(), res.getHeader('Upload-Offset') || null]);
  },
  onError(error) {
    console.log(JSON.stringify({error: String(error), seen}));
    process.exit(1);
  },
  onSuccess({lastResponse}) {
    console.log(JSON.stringify({url: upload.url, body: lastResponse.getBody(), seen}));
  },
});
upload.start();
"""


def run_client(root: Path, endpoint: str, source: Path, protocol: str, chunk: str,
               with_data: bool) -> dict:
    script = root / "ietf_upload.js"
    script.write_text(SCRIPT)
    result = subprocess.run(
        ["node", str(script), endpoint, str(source), protocol, chunk,
         "yes" if with_data else "no"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("store_kind", "protocol", "interop", "chunk", "with_data"),
    [
        ("filesystem", "ietf-draft-03", 5, "all", False),
        ("filesystem", "ietf-draft-05", 6, "all", False),
        # The first chunk goes with the creation request (creation with content).
        ("filesystem", "ietf-draft-05", 6, str(4 * MIB), True),
        ("s3", "ietf-draft-05", 6, str(8 * MIB), False),
        ("s3", "ietf-draft-03", 5, str(8 * MIB), False),
    ],
)
async def test_tus_js_client_ietf_mode_resumes_after_a_cut(
    proxies, store_harness, tmp_path: Path, protocol: str, interop: int, chunk: str,
    with_data: bool,
) -> None:
    root = node_packages("tus-js-client@4")
    proxy = await proxies.start()
    size = 20 * MIB + 4321
    data = os.urandom(size)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    cut_at = 9 * MIB + 17
    async with CuttingRelay(proxy.port, cut_after=cut_at) as relay:
        result = await asyncio.to_thread(
            run_client, root, f"{relay.url}/files/", source, protocol, chunk, with_data
        )
        assert relay.cuts == 1
    methods = [m for m, _, _ in result["seen"]]
    # Created, cut, asked for the offset and resumed: never started over.
    assert methods.count("POST") == 1, result["seen"]
    assert "HEAD" in methods, result["seen"]
    resumed_at = int(next(o for m, _, o in result["seen"] if m == "HEAD"))
    assert 0 < resumed_at <= cut_at
    doc = json.loads(result["body"])
    assert doc["size"] == size
    assert doc["crc32c"] == crc_b64(data)
    assert doc["name"] == "tus/from-node.bin"
    assert await stored_object(store_harness, doc["name"]) == data
    if with_data:
        assert result["seen"][0] == ["POST", 201, str(4 * MIB)]
    print(f"{protocol} (interop {interop}) on {store_harness.kind}: {size} bytes, cut at "
          f"{cut_at}, resumed at {resumed_at}, requests {methods}, bytes identical")
