"""Promises of the README the S3 store used to break (issue 9), against a real
moto server over HTTP, through ``S3Gate`` where a test needs to steer S3.
Each test here failed on the code before its fix."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from app.config import replace as config_replace
from app.errors import (
    InvalidName,
    StorageMisconfigured,
    StorageRefused,
    StorageUnavailable,
    TooLarge,
    UploadError,
)
from app.stores.s3.store import S3Store
from tests.s3_gate import S3Gate, Seen
from tests.stores.fixtures import storage_config
from tests.stores.s3_support import AppProcess

MIB = 1024 * 1024
PREFIX = "uploads/"
OpenStore = Callable[..., Awaitable[S3Store]]


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
async def gate(moto_endpoint: str) -> AsyncIterator[S3Gate]:
    g = S3Gate(moto_endpoint)
    yield g
    await g.close()


@pytest.fixture
async def open_s3(tmp_path: Path, bucket: str) -> AsyncIterator[OpenStore]:
    opened: list[S3Store] = []

    async def _open(endpoint: str, s3: dict | None = None, **storage: object) -> S3Store:
        config = storage_config("s3", tmp_path, endpoint, bucket,
                                **{"part_size": 5 * MIB, **storage})
        if s3:
            config = config_replace(config, storage={"s3": s3})
        store = await S3Store.open(config.storage)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        await store.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def op(name: str) -> Callable[[Seen], bool]:
    """Matches requests of one S3 operation (by the shape of the request)."""
    def match(seen: Seen) -> bool:
        q = seen.query
        if name == "CreateMultipartUpload":
            return seen.method == "POST" and "uploads" in q
        if name == "UploadPart":
            return seen.is_upload_part()
        if name == "CompleteMultipartUpload":
            return seen.method == "POST" and "uploadId" in q
        if name == "PutRecord":
            return seen.method == "PUT" and "/.uploads/sessions/" in seen.path
        if name == "PutStaged":
            return seen.method == "PUT" and "/.uploads/staged/" in seen.path
        raise AssertionError(name)
    return match


# -- item 10: names that do not fit, and permanent S3 refusals -------------------------


async def test_names_are_checked_against_the_key_room_the_prefix_leaves(
        gate, open_s3, bucket, http, tmp_path) -> None:
    store = await open_s3(await gate.listener("store"))
    assert store.max_name_bytes == 1024 - len(PREFIX)
    longest = "n" * store.max_name_bytes
    info = await store.create(longest, total=None, content_type="x", metadata={}, owner=None)
    assert info.offset == 0
    with pytest.raises(InvalidName, match="1016 UTF-8 bytes"):
        await store.create(longest + "n", total=None, content_type="x", metadata={},
                           owner=None)
    # Multi-byte characters count as their UTF-8 bytes.
    with pytest.raises(InvalidName):
        await store.create("é" * 509, total=None, content_type="x", metadata={}, owner=None)
    assert not [s for s in gate.seen() if op("CreateMultipartUpload")(s)
                and s.path.endswith("é")]
    # Through a real server process: a valid 1024-byte name, 1032 bytes with the
    # prefix, is a 400 the client can act on, never a 503 to retry forever.
    server = AppProcess(await gate.listener("app"), bucket, tmp_path / "app.log")
    try:
        await server.start(http)
        async with http.put(f"{server.url}/upload/{'a' * 1024}", data=b"abc") as resp:
            assert resp.status == 400, await resp.text()
            body = await resp.json()
            assert body["error"] == "invalid_name"
            assert "1016" in body["message"]
            assert "Retry-After" not in resp.headers
    finally:
        await server.stop()


REFUSALS: dict[str, tuple[int, type[UploadError], int, bool]] = {
    # code: (HTTP status S3 answers, error raised, status the client gets, Retry-After)
    "KeyTooLongError": (400, InvalidName, 400, False),
    "InvalidArgument": (400, StorageRefused, 400, False),
    "EntityTooLarge": (400, TooLarge, 413, False),
    "AccessDenied": (403, StorageMisconfigured, 500, False),
    "NoSuchBucket": (404, StorageMisconfigured, 500, False),
    "SlowDown": (503, StorageUnavailable, 503, True),
    "RequestLimitExceeded": (503, StorageUnavailable, 503, True),
    "InternalError": (500, StorageUnavailable, 503, True),
    "ServiceUnavailable": (503, StorageUnavailable, 503, True),
}


@pytest.mark.parametrize("code", sorted(REFUSALS))
async def test_s3_errors_are_classified_permanent_or_transient(gate, open_s3, code) -> None:
    s3_status, error, status, retry_after = REFUSALS[code]
    store = await open_s3(await gate.listener("store"), s3={"max_attempts": 1})
    gate.answer(op("CreateMultipartUpload"), s3_status, code, f"S3 says {code}")
    with pytest.raises(error) as raised:
        await store.create("a.bin", total=None, content_type="x", metadata={}, owner=None)
    assert raised.value.status == status
    assert ("Retry-After" in raised.value.headers()) == retry_after
    assert code in raised.value.message or error in (InvalidName, TooLarge)
