"""Promises of the README the S3 store used to break (issue 9), against a real
moto server over HTTP, through ``S3Gate`` where a test needs to steer S3.
Each test here failed on the code before its fix."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import google_crc32c
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
from app.ops.cleanup import run_cleanup
from app.stores.s3.store import S3Store
from tests.s3_gate import Seen
from tests.stores.fixtures import storage_config
from tests.stores.s3_support import AppProcess
from tests.stores.test_s3_store import emulate_s3_upload_listing

MIB = 1024 * 1024
PREFIX = "uploads/"
OpenStore = Callable[..., Awaitable[S3Store]]


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


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


# -- item 1: two processes appending different bytes to one upload ---------------------

P = 5 * MIB
TOTAL = P + 4096


def crc_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode("ascii")


def of(tag: str, name: str, match: Callable[[Seen], bool]) -> Callable[[Seen], bool]:
    return lambda seen: seen.tag == tag and match(seen) \
        and (name in seen.path or "/.uploads/sessions/" in seen.path)


def part(number: int) -> Callable[[Seen], bool]:
    return lambda seen: seen.is_upload_part() and seen.query["partNumber"] == str(number)


def list_parts(seen: Seen) -> bool:
    return seen.method == "GET" and "uploadId" in seen.query


async def send(http: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, Any, int]:
    """The whole object in one request, resending from the offset a 308 names
    (as resumable clients do); (final status, its JSON, 308s seen)."""
    start, resumed = 0, 0
    while True:
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        async with http.put(url, data=data[start:], headers=headers,
                            allow_redirects=False) as resp:
            if resp.status != 308 or resumed == 3:
                return resp.status, await resp.json(), resumed
            ranged = resp.headers.get("Range")
            start = int(ranged.rsplit("-", 1)[1]) + 1 if ranged else 0
            resumed += 1


#: How the loser's requests interleave with the winner's: which of the
#: loser's requests is held, and until which request of the winner arrives
#: (None: until the winner has its answer).
SCENARIOS = [
    # The loser's part 1 lands after the winner recorded its own part 1, just
    # before the winner's completion lists the parts: caught by the check.
    ("part 1 late, before the check", part(1), list_parts),
    # ... between the check and CompleteMultipartUpload: S3 compares ETags.
    ("part 1 late, before the completion", part(1), op("CompleteMultipartUpload")),
    # The loser's first record write (taking the lease) is held: the winner
    # finds no lease, takes it and completes; the loser's write comes last
    # and loses, before any part of it is uploaded.
    ("record write late", op("PutRecord"), None),
    # The loser's part lands after the winner completed.
    ("part 1 after completion", part(1), None),
]


async def test_two_processes_appending_different_bytes_never_make_a_chimera(
        gate, bucket, http, s3_client, tmp_path) -> None:
    # The loser's requests are held past its write lease, so the winner takes
    # the upload over after expiry: the window the lease leaves (a writer
    # paused longer than its lease), which these checks close.
    servers = {tag: AppProcess(await gate.listener(tag), bucket, tmp_path / f"{tag}.log",
                               env={"APP__STORAGE__LEASE_TTL": "1s"})
               for tag in "AB"}
    try:
        for server in servers.values():
            await server.start(http)
        for trial in range(10):
            description, held, until = SCENARIOS[trial % len(SCENARIOS)]
            loser, winner = ("A", "B") if trial % 2 == 0 else ("B", "A")
            name = f"race/{trial}.bin"
            data = {"A": payload(TOTAL, seed=2 * trial), "B": payload(TOTAL, seed=2 * trial + 1)}
            url = {tag: f"{servers[tag].url}/upload/{name}" for tag in "AB"}
            async with http.post(url["A"], headers={"X-Upload-Content-Length": str(TOTAL)}) as r:
                assert r.status == 200
            hold_loser = gate.hold(of(loser, name, held))
            hold_winner = gate.hold(of(winner, name, until)) if until else None
            losing = asyncio.create_task(send(http, url[loser], data[loser]))
            # Both read the record at offset 0 before either writes it.
            await hold_loser.arrived.wait()
            winning = asyncio.create_task(send(http, url[winner], data[winner]))
            if hold_winner is not None:
                await hold_winner.arrived.wait()
                hold_loser.release()
                lost = await losing
                hold_winner.release()
                won = await winning
            else:
                won = await winning
                hold_loser.release()
                lost = await losing
            gate.clear()
            stored = s3_client.get_object(Bucket=bucket, Key=PREFIX + name)["Body"].read()
            context = f"trial {trial} ({description}): winner {won[:1]}, loser {lost[:2]}"
            assert won[0] == 200, context
            assert stored == data[winner], context
            assert won[1]["crc32c"] == crc_b64(stored), context
            if description == "part 1 after completion":
                # S3 answers NoSuchUpload (404 here); moto fails with a 500
                # (503 + Retry-After here). Either way a probe then shows the
                # loser an object whose crc32c is not that of its bytes.
                assert lost[0] in (404, 503), context
                async with http.put(url[loser], headers={"Content-Range": "bytes */*"}) as r:
                    assert r.status == 200
                    assert (await r.json())["crc32c"] != crc_b64(data[loser])
            else:
                assert lost[0] == 409, context
                assert lost[1]["error"] == "offset_mismatch", context
            if until is not None:
                # The winner's acknowledged part 1 was overwritten: it was asked
                # for it again and sent it, never given the loser's bytes.
                assert won[2] == 1, context
    finally:
        for server in servers.values():
            await server.stop()


# -- item 5: the cleanup job sweeps only what is provably ours -------------------------

HOUR = 3600.0


@pytest.mark.parametrize("prefix", ["", "uploads/"])
async def test_cleanup_never_aborts_another_applications_multipart_uploads(
        prefix, tmp_path, moto_endpoint, bucket, s3_client, monkeypatch) -> None:
    # moto dates every multipart upload 2010; list them with real times, as S3 does.
    emulate_s3_upload_listing(monkeypatch)
    config = storage_config("s3", tmp_path, moto_endpoint, bucket, part_size=5 * MIB)
    config = config_replace(config, storage={"s3": {"prefix": prefix}})
    store = await S3Store.open(config.storage)
    try:
        # Another tool's uploads, in the store's prefix and beside it.
        foreign = [f"{prefix}backups/db-2026-12-01.tar", "backups/other-tool.tar"]
        for key in foreign:
            upload = s3_client.create_multipart_upload(Bucket=bucket, Key=key)
            s3_client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                  PartNumber=1, Body=b"b" * 100)
        # Ours: a create that died after its multipart upload, before its record.
        crashed = f"{prefix}crashed.bin"
        await store.begin_multipart("d" * 32, {"Key": crashed, "ContentType": "x",
                                               "Metadata": {}})

        report = await run_cleanup(store, older_than=HOUR, now=time.time() + 2 * HOUR)
        assert report.errors == 0
        left = {u["Key"] for u in s3_client.list_multipart_uploads(Bucket=bucket)
                .get("Uploads", [])}
        assert left == set(foreign)
        assert report.orphans == 1
        markers = [k["Key"] for k in s3_client.list_objects_v2(
            Bucket=bucket, Prefix=f"{prefix}.uploads/markers/").get("Contents", [])]
        assert markers == []
    finally:
        await store.close()


# -- item 9: tiny chunks cost S3 a bounded number of bytes and requests ----------------


@pytest.mark.parametrize("declared", [True, False], ids=["total", "open"])
async def test_tiny_chunks_cost_s3_bounded_bytes_and_requests(
        declared, gate, bucket, http, s3_client, tmp_path) -> None:
    """200 one-byte chunks after a tail just short of a part (where each fold
    of the staged tail used to re-upload all of it), then the rest."""
    server = AppProcess(await gate.listener("app"), bucket, tmp_path / "app.log")
    total = 5 * MIB + 5
    data = payload(total, seed=9)
    name = "tiny/chunks.bin"
    url = f"{server.url}/upload/{name}"
    received = requests = 0
    offset = 0

    async def put(size: int) -> int:
        nonlocal received, requests, offset
        end = min(offset + size, total)
        stated = total if declared or end == total else "*"
        headers = {"Content-Range": f"bytes {offset}-{end - 1}/{stated}"}
        async with http.put(url, data=data[offset:end], headers=headers,
                            allow_redirects=False) as resp:
            received += end - offset
            requests += 1
            if resp.status == 308:
                ranged = resp.headers.get("Range")
                offset = int(ranged.rsplit("-", 1)[1]) + 1 if ranged else 0
            else:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["crc32c"] == crc_b64(data)
                offset = total
            return resp.status

    try:
        await server.start(http)
        gate.log.clear()
        assert await put(5 * MIB - 1000) == 308
        # 200 one-byte chunks, each sent at the offset the last 308 named (a
        # client resends what was not acknowledged).
        for _ in range(200):
            assert await put(1) == 308
        tiny_acknowledged = offset - (5 * MIB - 1000)
        while offset < total:
            await put(256 * 1024)
    finally:
        await server.stop()
    # The upload's budget of small writes is taken in full, then tiny
    # non-final chunks are not acknowledged (nothing of them reaches S3).
    assert tiny_acknowledged == 64
    assert s3_client.get_object(Bucket=bucket, Key=PREFIX + name)["Body"].read() == data
    seen = gate.seen("app")
    written = sum(s.size for s in seen)
    assert written <= 2 * received + 5 * MIB, (written, received)
    assert len(seen) <= 3 * requests, (len(seen), requests)
