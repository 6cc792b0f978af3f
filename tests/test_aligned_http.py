"""8 MiB ``Content-Range`` chunks over HTTP into S3: the engine tells the
store each chunk's declared length, so the upload settles 8 MiB parts and
every chunk is one part. The part boundaries are read from the finished
object's multipart ETag (MD5 of the parts' MD5s, then ``-<parts>``)."""

from __future__ import annotations

import hashlib
import os

import boto3
import pytest

from tests import test_http
from tests.test_http import put_range, stored_object

proxies = test_http.proxies

MIB = 1024 * 1024
CHUNK = 8 * MIB
S3_ONLY = pytest.mark.parametrize("store_kind", ["s3"])


def multipart_etag(data: bytes, part: int) -> str:
    pieces = [data[i : i + part] for i in range(0, len(data), part)]
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in pieces)).hexdigest()
    return f"{digest}-{len(pieces)}"


def object_etag(store_harness, name: str) -> str:
    storage = store_harness.storage
    client = boto3.client("s3", endpoint_url=storage.s3.endpoint_url, region_name="us-east-1")
    head = client.head_object(Bucket=storage.s3.bucket, Key=storage.s3.prefix + name)
    return str(head["ETag"]).strip('"')


@S3_ONLY
@pytest.mark.parametrize("total_known", [True, False], ids=["total", "no-total"])
async def test_8mib_chunks_become_8mib_parts(proxies, http, store_harness, total_known) -> None:
    proxy = await proxies.start()
    url = f"{proxy.url}/upload/aligned-http.bin"
    data = os.urandom(3 * CHUNK + MIB)
    assert store_harness.storage.part_size != CHUNK
    total = len(data) if total_known else None
    for start in range(0, 3 * CHUNK, CHUNK):
        resp = await put_range(http, url, data[start : start + CHUNK], start, total)
        assert resp.status == 308
    resp = await put_range(http, url, data[3 * CHUNK :], 3 * CHUNK, len(data))
    assert resp.status == 200
    assert await stored_object(store_harness, "aligned-http.bin") == data
    assert object_etag(store_harness, "aligned-http.bin") == multipart_etag(data, CHUNK)


@S3_ONLY
async def test_a_plain_put_keeps_the_configured_part_size(proxies, http, store_harness) -> None:
    proxy = await proxies.start()
    data = os.urandom(3 * CHUNK)
    async with http.put(f"{proxy.url}/upload/plain-http.bin", data=data) as resp:
        assert resp.status == 200
    part = store_harness.storage.part_size
    assert object_etag(store_harness, "plain-http.bin") == multipart_etag(data, part)
