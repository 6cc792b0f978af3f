"""Node's @google-cloud/storage, unmodified, through the proxy on both stores."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.cut_relay import CuttingRelay
from tests.gcs.support import BUCKET, MIB, gcs_proxies, start_gcs, stored  # noqa: F401
from tests.node_support import node_packages
from tests.test_http import crc_b64

SCRIPT = Path(__file__).parent / "node" / "upload.js"
PACKAGE = "@google-cloud/storage@7.22.0"


async def node_upload(endpoint: str, name: str, source: Path, chunk: int | None) -> dict:
    root = node_packages(PACKAGE)
    args = [str(SCRIPT), endpoint, BUCKET, name, str(source)]
    if chunk is not None:
        args.append(str(chunk))
    proc = await asyncio.create_subprocess_exec(
        "node", *args, env={**os.environ, "NODE_PATH": str(root / "node_modules")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("chunk", [None, 4 * MIB], ids=["streamed", "chunked"])
async def test_create_write_stream(
    gcs_proxies, store_harness, tmp_path: Path, chunk: int | None  # noqa: F811
) -> None:
    """Without chunkSize Node sends one request, 'Content-Range: bytes 0-*/*'
    with a body of unknown length; with it, 'bytes a-b/*' chunks and a last
    one with the total."""
    proxy = await start_gcs(gcs_proxies)
    data = os.urandom(9 * MIB + 321)
    source = tmp_path / "clip.mp4"
    source.write_bytes(data)
    meta = await node_upload(proxy.url, "node/clip.mp4", source, chunk)
    assert meta["name"] == "node/clip.mp4" and meta["bucket"] == BUCKET
    assert int(meta["size"]) == len(data)
    assert meta["crc32c"] == crc_b64(data)
    assert meta["contentType"] == "video/mp4"
    assert meta["metadata"] == {"from": "node"}
    assert await stored(store_harness, "node/clip.mp4") == data


async def test_chunked_upload_cut_mid_chunk_resumes(
    gcs_proxies, store_harness, tmp_path: Path  # noqa: F811
) -> None:
    """A chunk is cut once; Node (told to retry) asks for the offset and
    resends from there. (Its streamed mode cannot do this: it keeps no copy
    of the bytes in flight and stops with a RangeError, against GCS too.)"""
    proxy = await start_gcs(gcs_proxies, storage={"md5": False})
    data = os.urandom(10 * MIB + 99)
    source = tmp_path / "cut.bin"
    source.write_bytes(data)
    async with CuttingRelay(proxy.port, cut_after=7 * MIB) as relay:
        meta = await node_upload(relay.url, "node/cut.bin", source, 4 * MIB)
        assert relay.cuts == 1
    assert int(meta["size"]) == len(data)
    assert meta["crc32c"] == crc_b64(data)
    assert await stored(store_harness, "node/cut.bin") == data
