"""google-cloud-storage and gcsfs, unmodified, through the proxy on both stores."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

import google_crc32c
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from tests.cut_relay import CuttingRelay
from tests.gcs.support import BUCKET, MIB, gcs_proxies, start_gcs, stored  # noqa: F401

# gcsfs's default class first probes the endpoint for gRPC (60 s per bucket
# against plain HTTP) unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false is set
# before it is imported; its plain class, which it falls back to, does not.
GCSFileSystem = pytest.importorskip("gcsfs.core").GCSFileSystem


def crc_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def gcs_client(url: str) -> storage.Client:
    return storage.Client(
        project="test", credentials=AnonymousCredentials(),
        client_options={"api_endpoint": url},
    )


def upload_file(url: str, name: str, path: Path, checksum: str) -> storage.Blob:
    blob = gcs_client(url).bucket(BUCKET).blob(name, chunk_size=8 * MIB)
    blob.upload_from_filename(str(path), content_type="video/mp4", checksum=checksum)
    return blob


@pytest.mark.parametrize("checksum", ["crc32c", "md5"])
async def test_chunked_upload_cut_mid_chunk_resumes_by_the_clients_own_retry(
    gcs_proxies, store_harness, tmp_path: Path, checksum: str  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    data = os.urandom(50 * MIB + 12_345)
    source = tmp_path / "movie.bin"
    source.write_bytes(data)
    # The cut falls inside the third 8 MiB chunk.
    async with CuttingRelay(proxy.port, cut_after=19 * MIB) as relay:
        blob = await asyncio.to_thread(upload_file, relay.url, "videos/movie.bin", source,
                                       checksum)
        assert relay.cuts == 1
    assert blob.size == len(data)
    assert blob.crc32c == crc_b64(data)
    # google-cloud-storage itself fails a checksum="md5" upload without md5Hash.
    assert blob.md5_hash == md5_b64(data)
    assert blob.bucket.name == BUCKET and blob.name == "videos/movie.bin"
    assert blob.content_type == "video/mp4"
    assert isinstance(blob.generation, int) and blob.generation > 0
    assert await stored(store_harness, "videos/movie.bin") == data


def upload_string(url: str, name: str, data: bytes, checksum: str) -> storage.Blob:
    blob = gcs_client(url).bucket(BUCKET).blob(name)
    blob.metadata = {"owner": "u1"}
    blob.upload_from_string(data, content_type="text/plain", checksum=checksum)
    return blob


@pytest.mark.parametrize("checksum", ["crc32c", "md5"])
async def test_upload_from_string_is_one_multipart_request(
    gcs_proxies, store_harness, checksum: str  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    data = b"hello, proxy\n" * 1000
    blob = await asyncio.to_thread(upload_string, proxy.url, "notes/hello.txt", data, checksum)
    assert blob.size == len(data)
    assert blob.crc32c == crc_b64(data)
    assert blob.md5_hash == md5_b64(data)
    assert blob.metadata == {"owner": "u1"}
    assert blob.content_type == "text/plain"
    assert await stored(store_harness, "notes/hello.txt") == data


async def test_concurrent_uploads_with_different_and_with_the_same_name(
    gcs_proxies, store_harness, tmp_path: Path  # noqa: F811
) -> None:
    proxy = await start_gcs(gcs_proxies)
    first, second, third = (os.urandom(9 * MIB + n) for n in (1, 2, 3))
    paths = []
    for n, data in enumerate((first, second, third)):
        paths.append(tmp_path / f"f{n}")
        paths[-1].write_bytes(data)
    blobs = await asyncio.gather(
        asyncio.to_thread(upload_file, proxy.url, "a.bin", paths[0], "crc32c"),
        asyncio.to_thread(upload_file, proxy.url, "b.bin", paths[1], "crc32c"),
        asyncio.to_thread(upload_file, proxy.url, "b.bin", paths[2], "crc32c"),
    )
    assert await stored(store_harness, "a.bin") == first
    # Two sessions for one name never share bytes: whichever finished last
    # is the object, whole, and its generation is the later one.
    # (Which one finished last is the store's to order; that the bytes are
    # one upload's, whole, is the dialect's promise.)
    same = await stored(store_harness, "b.bin")
    assert same in (second, third)
    assert {blobs[1].crc32c, blobs[2].crc32c} == {crc_b64(second), crc_b64(third)}
    assert blobs[1].generation != blobs[2].generation
    assert blobs[0].crc32c == crc_b64(first)


def gcsfs_write(url: str, data: bytes, small: bytes) -> None:
    fs = GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True)
    # Writes of 3 MiB into 5 MiB blocks: gcsfs POSTs 256 KiB-aligned chunks
    # with 'bytes a-b/*' and a last one with the total.
    with fs.open(f"{BUCKET}/fs/big.bin", "wb", block_size=5 * MIB) as handle:
        for offset in range(0, len(data), 3 * MIB):
            handle.write(data[offset : offset + 3 * MIB])
    # A multipart body with bare-LF line endings.
    fs.pipe_file(f"{BUCKET}/fs/small.txt", small)


async def test_gcsfs_open_wb_and_pipe_file(gcs_proxies, store_harness) -> None:  # noqa: F811
    proxy = await start_gcs(gcs_proxies)
    data = os.urandom(21 * MIB + 777)
    small = b"tiny\nobject\n"
    await asyncio.to_thread(gcsfs_write, proxy.url, data, small)
    assert await stored(store_harness, "fs/big.bin") == data
    assert await stored(store_harness, "fs/small.txt") == small
