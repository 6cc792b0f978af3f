"""S3-specific behaviour of ``S3Store`` against a real moto server over HTTP.

The generic Store contract is checked by the shared conformance suite; these
tests look at what only S3 has: parts, staged objects, conditional records,
part-size arithmetic, a backend cut mid-write, and what lands in the bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from app.config import Config
from app.config import replace as config_replace
from app.core.protocol import MAX_OBJECT_SIZE, MAX_PARTS, MIB
from app.errors import OffsetMismatch, StorageUnavailable, TooLarge, TotalMismatch
from app.ops.metrics import Metrics
from app.stores.base import (
    CallbackOutbox,
    HealthCheck,
    NotAnOrphan,
    Orphan,
    OrphanSweeper,
    ReportsCalls,
    UploadInfo,
)
from app.stores.s3.records import Record
from app.stores.s3.store import S3Store
from app.stores.s3.writer import GRANULE, SMALL_WRITE_BUDGET
from tests.stores.fixtures import storage_config

P = 5 * MIB
PREFIX = "uploads/"
HOUR = 3600.0

OpenStore = Callable[..., Awaitable[S3Store]]


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def stream(data: bytes, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


def make_config(tmp_path: Path, endpoint: str, bucket: str, *, s3: dict | None = None,
                **storage: object) -> Config:
    config = storage_config("s3", tmp_path, endpoint, bucket, part_size=P, **storage)
    return config_replace(config, storage={"s3": s3}) if s3 else config


@pytest.fixture
async def open_s3(tmp_path: Path, moto_endpoint: str, bucket: str) -> AsyncIterator[OpenStore]:
    """Open S3Store instances over the test bucket (each one a 'process')."""
    opened: list[S3Store] = []

    async def _open(*, endpoint: str | None = None, s3: dict | None = None,
                    **storage: object) -> S3Store:
        config = make_config(tmp_path, endpoint or moto_endpoint, bucket, s3=s3, **storage)
        store = await S3Store.open(config.storage)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        await store.close()


def keys(s3_client, bucket: str, prefix: str = "") -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def read_object(s3_client, bucket: str, name: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=PREFIX + name)["Body"].read()


def list_parts(s3_client, bucket: str, name: str) -> list[tuple[int, int]]:
    upload = s3_client.list_multipart_uploads(Bucket=bucket, Prefix=PREFIX + name)["Uploads"]
    assert len(upload) == 1
    parts = s3_client.list_parts(Bucket=bucket, Key=PREFIX + name, UploadId=upload[0]["UploadId"])
    return [(p["PartNumber"], p["Size"]) for p in parts.get("Parts", [])]


def staged_prefix(session_id: str) -> str:
    return f"{PREFIX}.uploads/staged/{session_id}/"


def staged_starts(s3_client, bucket: str, prefix: str) -> list[int]:
    """Start offsets of the staged objects (keys are ``{start:020d}-{token}``)."""
    return [int(k[len(prefix) :].split("-")[0]) for k in keys(s3_client, bucket, prefix)]


async def create(store: S3Store, name: str, total: int | None, **kwargs: object) -> UploadInfo:
    return await store.create(
        name, total=total, content_type=str(kwargs.get("content_type", "application/x-test")),
        metadata=kwargs.get("metadata", {}), owner=None,  # type: ignore[arg-type]
    )


# -- layout -------------------------------------------------------------------


async def test_parts_are_equal_size_except_the_last(open_s3, s3_client, bucket):
    store = await open_s3()
    data = payload(2 * P + 2 * MIB + 123)
    info = await create(store, "a/b.bin", len(data))
    # Odd write boundaries: every part still ends on a multiple of P.
    cuts = [0, 2 * MIB + 1, 9 * MIB + 7, len(data)]
    for start, end in itertools.pairwise(cuts):
        info = await store.write(info, stream(data[start:end], chunk=300_001))
        assert info.offset == end
    assert list_parts(s3_client, bucket, "a/b.bin") == [(1, P), (2, P), (3, 2 * MIB + 123)]
    done = await store.finish(info)
    assert done.completed is not None and done.completed.size == len(data)
    assert done.completed.crc32c == google_crc32c.value(data)
    assert read_object(s3_client, bucket, "a/b.bin") == data


async def test_staged_tail_objects_live_under_the_reserved_prefix(open_s3, s3_client, bucket):
    store = await open_s3()
    data = payload(P + 3 * MIB)
    info = await create(store, "tail.bin", None)
    info = await store.write(info, stream(data[: 1 * MIB]))
    info = await store.write(info, stream(data[1 * MIB : 2 * MIB + 5]))
    staged = staged_prefix(info.session_id)
    assert staged_starts(s3_client, bucket, staged) == [0, MIB]
    record_key = f"{PREFIX}.uploads/sessions/{hashlib.sha256(b'tail.bin').hexdigest()}.json"
    assert record_key in keys(s3_client, bucket)
    assert PREFIX + "tail.bin" not in keys(s3_client, bucket)  # nothing visible before finish

    # Filling the part folds the staged segments into part 1 and deletes them.
    info = await store.write(info, stream(data[2 * MIB + 5 : P + MIB]))
    assert staged_starts(s3_client, bucket, staged) == [P]
    assert list_parts(s3_client, bucket, "tail.bin") == [(1, P)]

    info = await store.write(info, stream(data[P + MIB :]), total=len(data))
    done = await store.finish(info)
    assert keys(s3_client, bucket, staged) == []
    assert keys(s3_client, bucket, PREFIX + "tail") == [PREFIX + "tail.bin"]
    assert read_object(s3_client, bucket, "tail.bin") == data
    assert done.completed is not None and done.completed.crc32c == google_crc32c.value(data)


async def test_small_writes_past_the_budget_are_kept_in_whole_granules(
        open_s3, s3_client, bucket):
    store = await open_s3()
    data = payload(P + 300_000)
    info = await create(store, "small.bin", None)
    for i in range(SMALL_WRITE_BUDGET):
        info = await store.write(info, stream(data[i * 100 : (i + 1) * 100]))
        assert info.offset == (i + 1) * 100
    # The budget is spent: a tiny write is not kept at all, one that crosses a
    # granule boundary up to it; nothing is ever folded (re-uploaded).
    at = info.offset
    info = await store.write(info, stream(data[at : at + 100]))
    assert info.offset == at
    info = await store.write(info, stream(data[at : GRANULE + 10]))
    assert info.offset == GRANULE
    assert info.crc32c == google_crc32c.value(data[:GRANULE])
    staged = keys(s3_client, bucket, staged_prefix(info.session_id))
    assert len(staged) == SMALL_WRITE_BUDGET + 1
    fresh = await open_s3()  # cannot use this process's cache
    info = await fresh.get("small.bin")
    assert info.offset == GRANULE and info.crc32c == google_crc32c.value(data[:GRANULE])
    # A write that completes the upload is kept whole, whatever its size.
    info = await fresh.write(info, stream(data[GRANULE:]), total=len(data))
    assert info.offset == len(data)
    await fresh.finish(info)
    assert read_object(s3_client, bucket, "small.bin") == data


async def test_object_carries_content_type_and_metadata(open_s3, s3_client, bucket):
    store = await open_s3()
    data = payload(1000)
    info = await create(store, "meta.txt", len(data), content_type="text/plain",
                        metadata={"Purpose": "test", "note": "café"})
    info = await store.write(info, stream(data))
    await store.finish(info)
    head = s3_client.head_object(Bucket=bucket, Key=PREFIX + "meta.txt")
    assert head["ContentType"] == "text/plain"
    assert head["Metadata"]["purpose"] == "test"
    assert head["Metadata"]["upload-session"] == info.session_id
    assert head["Metadata"]["note"].startswith("=?UTF-8?B?")  # RFC 2047 for non-ASCII
    assert (await store.get("meta.txt")).metadata == {"Purpose": "test", "note": "café"}


async def test_zero_byte_upload(open_s3, s3_client, bucket):
    store = await open_s3()
    info = await create(store, "empty", 0, content_type="text/plain")
    info = await store.write(info, stream(b""))
    done = await store.finish(info)
    assert done.completed is not None and done.completed.size == 0
    assert done.completed.crc32c == 0
    head = s3_client.head_object(Bucket=bucket, Key=PREFIX + "empty")
    assert head["ContentLength"] == 0 and head["ContentType"] == "text/plain"
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def test_finish_twice_and_after_a_crash_before_the_record_update(
    open_s3, s3_client, bucket
):
    store = await open_s3()
    data = payload(P + 100)
    info = await create(store, "twice.bin", len(data))
    record_key = f"{PREFIX}.uploads/sessions/{hashlib.sha256(b'twice.bin').hexdigest()}.json"
    info = await store.write(info, stream(data))
    unfinished_record = s3_client.get_object(Bucket=bucket, Key=record_key)["Body"].read()
    first = await store.finish(info)
    assert await store.finish(info) == first
    assert await store.finish(first) == first
    assert await (await open_s3()).finish(info) == first

    # A crash between CompleteMultipartUpload and the record update, seen once
    # the crashed writer's lease ran out: the MPU is gone, the record still
    # says unfinished. The object's session tag settles it.
    doc = json.loads(unfinished_record)
    assert doc["lease"] is not None  # the full upload's writer kept it to finish
    doc["lease"] = None
    s3_client.put_object(Bucket=bucket, Key=record_key, Body=json.dumps(doc).encode())
    fresh = await open_s3()
    again = await fresh.finish(await fresh.get("twice.bin"))
    assert again.completed is not None and first.completed is not None
    assert again.completed.etag == first.completed.etag
    assert again.completed.size == len(data)
    assert read_object(s3_client, bucket, "twice.bin") == data


async def test_when_required_checksum_mode_sends_no_part_checksums(open_s3, s3_client, bucket):
    store = await open_s3(s3={"checksum_mode": "when_required"})
    data = payload(P + 4321)
    info = await create(store, "plain.bin", None)
    info = await store.write(info, stream(data[:MIB]))
    info = await store.write(info, stream(data[MIB:]), total=len(data))
    await store.finish(info)
    assert read_object(s3_client, bucket, "plain.bin") == data


# -- restarts and concurrency ----------------------------------------------------


async def test_a_new_instance_continues_an_upload(open_s3, s3_client, bucket):
    first = await open_s3()
    data = payload(2 * P + 3 * MIB + 17, seed=7)
    info = await create(first, "resume.bin", len(data))
    info = await first.write(info, stream(data[: P + 2 * MIB]))
    await first.close()

    second = await open_s3()
    info = await second.get("resume.bin")
    assert info.offset == P + 2 * MIB
    assert info.crc32c == google_crc32c.value(data[: P + 2 * MIB])
    assert info.part_size == P
    # The staged tail [P, P + 2 MiB) must come from the bucket, not a cache.
    assert second.cached_staged_bytes == 0
    info = await second.write(info, stream(data[P + 2 * MIB :], chunk=1_000_003))
    done = await second.finish(info)
    assert read_object(s3_client, bucket, "resume.bin") == data
    assert done.completed is not None and done.completed.crc32c == google_crc32c.value(data)


async def test_conditional_record_write_refuses_a_second_instance(open_s3, s3_client, bucket):
    a, b = await open_s3(), await open_s3()
    data = payload(3 * MIB)
    info = await create(a, "race.bin", None)
    a_done = asyncio.Event()
    b_streaming = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[:MIB]
        # B read the record before it took the first chunk and now asks for more.
        b_streaming.set()
        await a_done.wait()  # A advances the upload while B is mid-request

    b_write = asyncio.create_task(b.write(info, slow_body()))
    async with asyncio.timeout(30):
        await b_streaming.wait()
    a_info = await a.write(info, stream(data[: 2 * MIB]))
    a_done.set()
    with pytest.raises(OffsetMismatch) as caught:
        await b_write
    assert caught.value.offset == a_info.offset == 2 * MIB
    # A stale UploadInfo is refused before anything is written.
    with pytest.raises(OffsetMismatch):
        await b.write(info, stream(data[:MIB]))
    current = await b.get("race.bin")
    assert current.offset == 2 * MIB
    assert current.crc32c == google_crc32c.value(data[: 2 * MIB])
    # The loser's bytes never replaced the winner's staged data.
    fresh = await open_s3()
    info = await fresh.write(await fresh.get("race.bin"), stream(data[2 * MIB :]),
                             total=len(data))
    await fresh.finish(info)
    assert read_object(s3_client, bucket, "race.bin") == data


# -- sizes ------------------------------------------------------------------------


async def test_part_size_grows_for_large_totals(open_s3):
    store = await open_s3()
    info = await create(store, "big.bin", MAX_PARTS * P + 1)
    assert info.part_size == P + MIB  # the smallest whole MiB that fits 10,000 parts
    assert (await create(store, "fits.bin", MAX_PARTS * P)).part_size == P
    huge = await create(store, "huge.bin", MAX_OBJECT_SIZE)
    assert huge.part_size * MAX_PARTS >= MAX_OBJECT_SIZE
    with pytest.raises(TooLarge):
        await create(store, "toobig.bin", MAX_OBJECT_SIZE + 1)


async def test_unknown_total_is_capped_at_10000_parts(open_s3):
    store = await open_s3()
    info = await create(store, "open.bin", None)
    assert info.part_size == P
    with pytest.raises(TooLarge):
        await store.write(info, stream(b""), total=MAX_PARTS * P + 1)
    info = await store.write(info, stream(b""), total=MAX_PARTS * P)
    assert info.total == MAX_PARTS * P


async def test_bytes_past_the_total_are_refused_but_the_rest_kept(open_s3, s3_client, bucket):
    store = await open_s3()
    data = payload(MIB)
    info = await create(store, "over.bin", MIB - 10)
    with pytest.raises(TotalMismatch):
        await store.write(info, stream(data))
    info = await store.get("over.bin")
    assert info.offset == MIB - 10
    await store.finish(info)
    assert read_object(s3_client, bucket, "over.bin") == data[: MIB - 10]


# -- faults -------------------------------------------------------------------------


async def test_s3_cut_mid_write_keeps_a_durable_prefix(open_s3, s3_client, bucket, relay):
    cut = await open_s3(endpoint=relay.url, s3={"max_attempts": 1, "connect_timeout": 2,
                                                "read_timeout": 5})
    data = payload(5 * P + 123, seed=3)
    info = await create(cut, "cut.bin", len(data))
    info = await cut.write(info, stream(data[: MIB]))  # a staged tail before the cut
    observer = await open_s3()

    async def recorded_at_least(offset: int) -> None:
        async with asyncio.timeout(60):
            while (await observer.get("cut.bin")).offset < offset:
                await asyncio.sleep(0.02)

    async def body() -> AsyncIterator[bytes]:
        sent = MIB
        while sent < len(data):
            yield data[sent : sent + MIB]
            sent += MIB
            if sent == 3 * P:
                await recorded_at_least(P)  # the first parts have landed
                await asyncio.to_thread(relay.stop)

    with pytest.raises(StorageUnavailable):
        await cut.write(info, body())

    await asyncio.to_thread(relay.start)
    info = await (await open_s3()).get("cut.bin")
    assert info.offset in (MIB, P, 2 * P, 3 * P)
    assert info.offset >= P  # parts that landed before the cut were recorded
    assert info.crc32c == google_crc32c.value(data[: info.offset])
    # The same instance goes on: the lease it could not release while S3 was
    # away is still its own (another instance would wait for it to expire).
    info = await cut.write(info, stream(data[info.offset :]))
    await cut.finish(info)
    assert read_object(s3_client, bucket, "cut.bin") == data


async def test_s3_down_at_write_start_is_storage_unavailable(open_s3, relay):
    store = await open_s3(endpoint=relay.url, s3={"max_attempts": 1})
    info = await create(store, "down.bin", None)
    await asyncio.to_thread(relay.stop)
    with pytest.raises(StorageUnavailable) as caught:
        await store.write(info, stream(b"x" * 100))
    # The record this store wrote at create is known: staging is the first call.
    assert "PutObject" in caught.value.message
    with pytest.raises(StorageUnavailable):
        await store.check_health()


async def test_a_failing_body_keeps_full_parts_and_stages_the_rest(open_s3, s3_client, bucket):
    store = await open_s3()
    data = payload(2 * P, seed=9)
    info = await create(store, "broken.bin", len(data))

    async def body() -> AsyncIterator[bytes]:
        yield data[: P + 2 * MIB]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.write(info, body())
    info = await (await open_s3()).get("broken.bin")
    assert info.offset == P + 2 * MIB
    assert info.crc32c == google_crc32c.value(data[: P + 2 * MIB])
    assert list_parts(s3_client, bucket, "broken.bin") == [(1, P)]
    assert staged_starts(s3_client, bucket, staged_prefix(info.session_id)) == [P]


class Hold:
    """Holds one S3 request of this store's client (the first ``operation``
    whose URL contains ``marker``, after letting ``skip`` of them through)
    until ``release`` is set; ``entered`` tells that it is being held."""

    def __init__(self, store: S3Store, operation: str, marker: str = "", skip: int = 0) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self._marker = marker
        self._skip = skip
        self._armed = True
        store.client.events.register(f"before-send.s3.{operation}", self._hold)

    async def _hold(self, request: Any, **_: Any) -> None:
        if not self._armed or self._marker not in request.url:
            return
        if self._skip:
            self._skip -= 1
            return
        self._armed = False
        self.entered.set()
        await self.release.wait()


#: Where a write is when it is cancelled: (the request held there as
#: (operation, URL marker, requests let through first) or None, bytes the body
#: sends after a 1 MiB staged prefix, whether it then waits for more instead
#: of ending, the offset the upload must be left at and its staged segments).
CANCEL_POINTS: dict[str, tuple[tuple[str, str, int] | None, int, bool, int, list[int]]] = {
    # What arrived is kept: part 1 and a staged tail.
    "waiting for body bytes": (None, P + 2 * MIB, True, P + 3 * MIB, [P]),
    # Part 1 held in flight, part 2 full and waiting for the only slot.
    "waiting for a part slot": (("UploadPart", "", 0), 2 * P - MIB, False, MIB, [0]),
    # Part 1 landed and was recorded; part 2 held, the body over.
    "during a part upload": (("UploadPart", "", 1), 2 * P - MIB, False, P, []),
    # The record update after part 1 (the one after the lease's), held while
    # the body goes on: it was sent, so it lands, and part 2 after it.
    "during a part's record write":
        (("PutObject", "/sessions/", 1), 2 * P - MIB, True, 2 * P, []),
    # The staged tail, held: it lands, but the record never names it.
    "during staging of the tail": (("PutObject", "/staged/", 0), 2 * MIB, False, MIB, [0]),
    # The record update naming the new staged tail, held: it lands.
    "during the final record write":
        (("PutObject", "/sessions/", 0), 2 * MIB, False, 3 * MIB, [0, MIB]),
}


@pytest.mark.parametrize("point", list(CANCEL_POINTS))
async def test_a_write_cancelled_anywhere_leaks_nothing(open_s3, s3_client, bucket, point):
    hold_at, body_length, waits, left_at, staged_at = CANCEL_POINTS[point]
    store = await open_s3(parts_in_flight=1)
    data = payload(3 * P, seed=4)
    info = await create(store, "cancel.bin", len(data))
    info = await store.write(info, stream(data[:MIB]))
    hold = Hold(store, *hold_at) if hold_at else None
    last_chunk = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        end = MIB + body_length
        for start in range(MIB, end, MIB):
            if start + MIB >= end:
                last_chunk.set()
            yield data[start : min(start + MIB, end)]
        if waits:
            await asyncio.Event().wait()  # a client that went quiet

    write = asyncio.create_task(store.write(info, body()))
    await last_chunk.wait()
    if hold is not None:
        await hold.entered.wait()
    if point == "waiting for a part slot":
        assert store.buffered_bytes == 2 * P  # part 1 in flight, part 2 full
    write.cancel()
    if hold is not None:
        hold.release.set()  # a request already sent is awaited to its end
    with pytest.raises(asyncio.CancelledError):
        await write

    assert store.buffered_bytes == 0
    info = await store.get("cancel.bin")
    assert info.offset == left_at
    assert info.crc32c == google_crc32c.value(data[: info.offset])
    loaded = await store.records.read("cancel.bin")
    assert loaded is not None
    named = sorted(staged_prefix(info.session_id) + s.leaf for s in loaded[0].staged)
    assert sorted(keys(s3_client, bucket, staged_prefix(info.session_id))) == named
    assert [s.start for s in loaded[0].staged] == staged_at
    fresh = await open_s3()  # no cached staged bytes: the bucket must hold them
    info = await fresh.write(info, stream(data[info.offset :]))
    await fresh.finish(info)
    assert read_object(s3_client, bucket, "cancel.bin") == data


# -- resources -----------------------------------------------------------------------


async def test_memory_stays_within_parts_in_flight_plus_one(open_s3, s3_client, bucket):
    store = await open_s3(parts_in_flight=2)
    data = payload(6 * P, seed=5)
    info = await create(store, "mem.bin", len(data))
    store.reset_peak_buffered()
    info = await store.write(info, stream(data, chunk=64 * 1024))
    assert P <= store.peak_buffered_bytes <= 3 * P
    assert store.buffered_bytes == 0
    await store.finish(info)
    assert read_object(s3_client, bucket, "mem.bin") == data


async def test_nothing_is_written_to_local_disk(open_s3, s3_client, bucket, tmp_path,
                                                monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = sorted(os.walk(tmp_path))
    store = await open_s3()
    data = payload(P + MIB)
    info = await create(store, "disk.bin", len(data))
    info = await store.write(info, stream(data[:MIB]))
    info = await store.write(info, stream(data[MIB:]))
    await store.finish(info)
    assert sorted(os.walk(tmp_path)) == before
    assert read_object(s3_client, bucket, "disk.bin") == data


async def test_cancel_aborts_the_upload_and_deletes_staged_data(open_s3, s3_client, bucket):
    store = await open_s3()
    info = await create(store, "gone.bin", None)
    info = await store.write(info, stream(payload(P + 10)))
    assert keys(s3_client, bucket, staged_prefix(info.session_id))
    assert [i.name async for i in store.list_unfinished()] == ["gone.bin"]
    await store.cancel("gone.bin")
    assert keys(s3_client, bucket, PREFIX) == []
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    # A completed upload: cancel drops the record, never the object.
    info = await create(store, "kept.bin", 3)
    await store.finish(await store.write(info, stream(b"abc")))
    assert [i.name async for i in store.list_unfinished()] == []
    await store.cancel("kept.bin")
    assert keys(s3_client, bucket, PREFIX) == [PREFIX + "kept.bin"]


async def test_replacing_an_upload_discards_the_old_session(open_s3, s3_client, bucket):
    store = await open_s3()
    old = await create(store, "again.bin", None)
    old = await store.write(old, stream(payload(P + 10)))
    new = await create(store, "again.bin", 5)
    assert new.session_id != old.session_id and new.offset == 0
    assert keys(s3_client, bucket, staged_prefix(old.session_id)) == []
    uploads = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert len(uploads) == 1
    with pytest.raises(OffsetMismatch):
        await store.write(old, stream(b"late"))


async def test_health_check_and_callback_outbox(open_s3, s3_client, bucket):
    store = await open_s3()
    assert isinstance(store, HealthCheck) and isinstance(store, CallbackOutbox)
    await store.check_health()
    await store.save_pending("one", b"\x00payload-1")
    await store.save_pending("two", b"payload-2")
    assert await store.list_pending() == [("one", b"\x00payload-1"), ("two", b"payload-2")]
    await store.delete_pending("one")
    await store.delete_pending("missing")
    assert await (await open_s3()).list_pending() == [("two", b"payload-2")]
    assert all(k.startswith(f"{PREFIX}.uploads/callbacks/") for k in keys(s3_client, bucket))


async def test_create_bucket_when_configured(tmp_path, moto_endpoint, s3_client):
    name = f"created-{os.urandom(6).hex()}"
    config = make_config(tmp_path, moto_endpoint, name, s3={"create_bucket": True})
    store = await S3Store.open(config.storage)
    try:
        await store.check_health()
        again = await S3Store.open(config.storage)  # already there: fine
        await again.close()
    finally:
        await store.close()
    s3_client.head_bucket(Bucket=name)


# -- metrics -------------------------------------------------------------------------


def s3_calls(metrics: Metrics, operation: str) -> float:
    value = metrics.registry.get_sample_value(
        "upload_proxy_s3_request_duration_seconds_count", {"operation": operation})
    return value or 0.0


async def test_attached_metrics_time_the_stores_s3_calls(open_s3):
    store = await open_s3()
    assert isinstance(store, ReportsCalls)
    metrics = Metrics()
    store.observe_calls(metrics.s3_calls)
    store.observe_calls(metrics.s3_calls)  # a second attach must not count twice
    data = payload(P + 1000, seed=7)
    # Total unknown while writing: part 1 is uploaded, the rest staged.
    info = await store.write(await create(store, "metered.bin", None), stream(data))
    assert s3_calls(metrics, "UploadPart") == 1
    # The record's creation, the staged tail and the record's update.
    assert s3_calls(metrics, "PutObject") >= 3
    info = await store.write(info, stream(b""), total=len(data))
    await store.finish(info)
    # The staged tail went up as part 2 on finish.
    assert s3_calls(metrics, "UploadPart") == 2
    assert s3_calls(metrics, "CreateMultipartUpload") == 1
    assert s3_calls(metrics, "CompleteMultipartUpload") == 1


# -- orphans ---------------------------------------------------------------------------

#: moto 5 reports every multipart upload as initiated on 2010-11-10 and answers
#: ListMultipartUploads in one page whatever max-uploads says; orphan ages and
#: paging need what S3 does.
_MOTO_INITIATED = "_test_initiated"
_MOTO_EPOCH = datetime(2010, 11, 10, 20, 48, 33, tzinfo=UTC)


def emulate_s3_upload_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the in-process moto server list multipart uploads like S3: real
    initiation times, ordered by key then initiation, pages of at most 1,000
    with key/upload-id markers."""
    from moto.core.responses import ActionResult
    from moto.s3.models import FakeMultipart
    from moto.s3.responses import S3Response

    original_init = FakeMultipart.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        setattr(self, _MOTO_INITIATED, datetime.now(UTC))

    def list_multipart_uploads(self: Any) -> Any:
        def arg(name: str) -> str | None:
            return self.querystring.get(name, [None])[0]

        prefix = arg("prefix") or ""
        limit = min(int(arg("max-uploads") or 1000), 1000)
        key_marker, id_marker = arg("key-marker"), arg("upload-id-marker")
        uploads = sorted(
            (u for u in self.backend.list_multipart_uploads(self.bucket_name).values()
             if u.key_name.startswith(prefix)),
            key=lambda u: (u.key_name, getattr(u, _MOTO_INITIATED, _MOTO_EPOCH)),
        )
        start = 0
        if key_marker:
            after = [i + 1 for i, u in enumerate(uploads)
                     if u.key_name == key_marker and u.id == id_marker]
            start = after[0] if after else sum(1 for u in uploads if u.key_name <= key_marker)
        page = uploads[start:start + limit]
        truncated = start + limit < len(uploads)
        result: dict[str, Any] = {
            "Bucket": self.bucket_name, "KeyMarker": key_marker or "",
            "UploadIdMarker": id_marker or "", "Prefix": prefix, "MaxUploads": limit,
            "IsTruncated": truncated,
            "Uploads": [{"Key": u.key_name, "UploadId": u.id, "StorageClass": "STANDARD",
                         "Initiated": getattr(u, _MOTO_INITIATED, _MOTO_EPOCH)}
                        for u in page],
        }
        if truncated:
            result["NextKeyMarker"], result["NextUploadIdMarker"] = page[-1].key_name, page[-1].id
        self.data["Action"] = "ListMultipartUploads"
        return self.serialized(ActionResult(result))

    monkeypatch.setattr(FakeMultipart, "__init__", init)
    monkeypatch.setattr(S3Response, "list_multipart_uploads", list_multipart_uploads)


@pytest.fixture
def s3_like_upload_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    emulate_s3_upload_listing(monkeypatch)


def record_key(name: str) -> str:
    return f"{PREFIX}.uploads/sessions/{hashlib.sha256(name.encode()).hexdigest()}.json"


def upload_id_of(s3_client, bucket: str, key: str) -> str:
    uploads = s3_client.list_multipart_uploads(Bucket=bucket, Prefix=key)["Uploads"]
    assert len(uploads) == 1
    return uploads[0]["UploadId"]


def mark_upload(s3_client, bucket: str, key: str, prefix: str = PREFIX) -> None:
    """The marker the store writes before creating a multipart upload at ``key``."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}.uploads/markers/{digest}/{'c' * 32}",
                         Body=b"{}")


def stray_upload(s3_client, bucket: str, key: str, part: bytes = b"") -> str:
    """A multipart upload no session record knows: under the prefix, a create
    that died after its marker and CreateMultipartUpload; elsewhere, another
    application's."""
    if key.startswith(PREFIX):
        mark_upload(s3_client, bucket, key)
    upload_id = s3_client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    if part:
        s3_client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1,
                              Body=part)
    return upload_id


def found(orphans: list[Orphan]) -> set[tuple[str, str]]:
    return {(o.kind, o.key) for o in orphans}


async def test_s3_store_is_an_orphan_sweeper(open_s3):
    assert isinstance(await open_s3(), OrphanSweeper)


async def test_find_orphans_finds_each_kind_and_nothing_in_use(
    open_s3, s3_client, bucket, s3_like_upload_listing
):
    store = await open_s3()
    # In use: an upload with a full part and a staged tail, a finished upload,
    # a pending callback, and an upload whose finish completed the object but
    # crashed before the record said so (a retried finish still needs it).
    active_data = payload(P + 10, seed=8)
    active = await store.write(await create(store, "active.bin", None), stream(active_data))
    await store.finish(await store.write(await create(store, "done.bin", 3), stream(b"abc")))
    await store.save_pending("cb-1", b"callback")
    crashed = await store.write(await create(store, "crashed.bin", P), stream(payload(P)))
    crashed_id = upload_id_of(s3_client, bucket, PREFIX + "crashed.bin")
    part = s3_client.list_parts(Bucket=bucket, Key=PREFIX + "crashed.bin",
                                UploadId=crashed_id)["Parts"][0]
    s3_client.complete_multipart_upload(
        Bucket=bucket, Key=PREFIX + "crashed.bin", UploadId=crashed_id,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    # Not the store's: outside its prefix.
    outside_id = stray_upload(s3_client, bucket, "elsewhere/x.bin")
    s3_client.put_object(Bucket=bucket, Key="elsewhere/.uploads/staged/d/0-x", Body=b"o")

    # Orphans: a multipart upload without a record; a record whose multipart
    # upload was aborted (its named staged tail goes with it); staged data of a
    # session that is gone; and a losing write's segment in a live session.
    stray_upload(s3_client, bucket, PREFIX + "stray.bin", part=b"p" * 100)
    dead = await store.write(await create(store, "dead.bin", None), stream(b"d" * 10))
    s3_client.abort_multipart_upload(Bucket=bucket, Key=PREFIX + "dead.bin",
                                     UploadId=upload_id_of(s3_client, bucket, PREFIX + "dead.bin"))
    gone_key = f"{staged_prefix('f' * 32)}{0:020d}-0123456789abcdef"
    s3_client.put_object(Bucket=bucket, Key=gone_key, Body=b"g" * 50)
    losing_key = f"{staged_prefix(active.session_id)}{P:020d}-fedcba9876543210"
    s3_client.put_object(Bucket=bucket, Key=losing_key, Body=b"lost")

    # Everything is young yet: a create may be between its multipart upload
    # and its record, a write between its staged object and its record.
    assert await store.find_orphans(HOUR, time.time()) == []

    later = time.time() + 2 * HOUR
    orphans = await store.find_orphans(HOUR, later)
    assert found(orphans) == {
        ("multipart_upload", PREFIX + "stray.bin"),
        ("session_record", record_key("dead.bin")),
        ("staged_data", gone_key),
        ("staged_data", losing_key),
    }
    by_key = {o.key: o for o in orphans}
    dead_record = s3_client.get_object(Bucket=bucket, Key=record_key("dead.bin"))["Body"].read()
    assert by_key[PREFIX + "stray.bin"].size == 100
    assert by_key[PREFIX + "stray.bin"].upload_id is not None
    assert by_key[record_key("dead.bin")].size == len(dead_record) + 10
    assert (by_key[gone_key].size, by_key[losing_key].size) == (50, 4)
    assert all(time.time() - HOUR < o.last_modified <= time.time() for o in orphans)

    # A fresh instance (a separate cleanup process) removes them.
    sweeper = await open_s3()
    freed = {o.key: await sweeper.remove_orphan(o) for o in orphans}
    assert freed == {o.key: o.size for o in orphans}
    assert [await sweeper.remove_orphan(o) for o in orphans] == [0, 0, 0, 0]  # gone already

    uploads = s3_client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert sorted(u["Key"] for u in uploads) == ["elsewhere/x.bin", PREFIX + "active.bin"]
    assert outside_id in {u["UploadId"] for u in uploads}
    left = keys(s3_client, bucket)
    assert not [k for k in left if dead.session_id in k or "f" * 32 in k or k == losing_key]
    assert "elsewhere/.uploads/staged/d/0-x" in left
    assert await store.list_pending() == [("cb-1", b"callback")]
    assert read_object(s3_client, bucket, "done.bin") == b"abc"
    assert (await store.get("crashed.bin")).offset == P
    assert (await store.finish(crashed)).is_complete
    assert await sweeper.find_orphans(HOUR, later) == []
    # The live upload carries on untouched.
    info = await store.write(await store.get("active.bin"), stream(b"!"), total=P + 11)
    await store.finish(info)
    assert read_object(s3_client, bucket, "active.bin") == active_data + b"!"


async def test_remove_orphan_checks_again_before_removing(
    open_s3, s3_client, bucket, s3_like_upload_listing
):
    store = await open_s3()
    late_id = stray_upload(s3_client, bucket, PREFIX + "late.bin")
    await store.write(await create(store, "dead.bin", None), stream(b"d" * 10))
    s3_client.abort_multipart_upload(Bucket=bucket, Key=PREFIX + "dead.bin",
                                     UploadId=upload_id_of(s3_client, bucket, PREFIX + "dead.bin"))
    orphans = {o.key: o for o in await store.find_orphans(HOUR, time.time() + 2 * HOUR)}
    assert set(orphans) == {PREFIX + "late.bin", record_key("dead.bin")}

    # A create that was slow to write its record does so now...
    now = time.time()
    late = Record(name="late.bin", session_id="a" * 32, upload_id=late_id, offset=0,
                   total=None, part_size=P, crc32c=0, content_type="x", metadata={},
                   owner=None, created_at=now, updated_at=now, checksum_algorithm=None)
    await store.records.put(late, if_match=None)
    # ... and a client starts the dead upload over.
    await create(store, "dead.bin", None)

    for orphan in orphans.values():
        with pytest.raises(NotAnOrphan):
            await store.remove_orphan(orphan)
    await store.write(await store.get("late.bin"), stream(b"late"))
    assert (await store.get("dead.bin")).offset == 0
    assert len(s3_client.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 2

    # Nothing outside the store's areas is removed, whatever it is called.
    s3_client.put_object(Bucket=bucket, Key="outside.bin", Body=b"x")
    outside_id = stray_upload(s3_client, bucket, "other/late.bin")
    for orphan in (Orphan("staged_data", "outside.bin"),
                   Orphan("session_record", "outside.bin"),
                   Orphan("multipart_upload", "other/late.bin", upload_id=outside_id)):
        with pytest.raises(NotAnOrphan):
            await store.remove_orphan(orphan)
    assert s3_client.get_object(Bucket=bucket, Key="outside.bin")["Body"].read() == b"x"
    assert upload_id_of(s3_client, bucket, "other/late.bin") == outside_id


async def test_unreadable_records_keep_what_they_may_refer_to(
    open_s3, s3_client, bucket, s3_like_upload_listing
):
    store = await open_s3()
    s3_client.put_object(Bucket=bucket, Key=record_key("broken.bin"), Body=b"{not json")
    stray_upload(s3_client, bucket, PREFIX + "broken.bin")
    s3_client.put_object(Bucket=bucket, Key=f"{staged_prefix('e' * 32)}{0:020d}-x", Body=b"s")
    stray_upload(s3_client, bucket, PREFIX + "stray.bin")
    orphans = await store.find_orphans(HOUR, time.time() + 2 * HOUR)
    assert found(orphans) == {("multipart_upload", PREFIX + "stray.bin")}


async def test_find_orphans_pages_through_more_than_1000_uploads(
    open_s3, s3_client, bucket, s3_like_upload_listing
):
    store = await open_s3()
    metrics = Metrics()
    store.observe_calls(metrics.s3_calls)
    live = await create(store, "m/live.bin", None)
    names = [f"m/{i:04d}.bin" for i in range(1001)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: stray_upload(s3_client, bucket, PREFIX + name), names))
    stray_upload(s3_client, bucket, "outside/one.bin")
    orphans = await store.find_orphans(HOUR, time.time() + 2 * HOUR)
    assert sorted(o.key for o in orphans) == [PREFIX + name for name in names]
    assert {o.kind for o in orphans} == {"multipart_upload"}
    assert s3_calls(metrics, "ListMultipartUploads") == 2
    assert await store.remove_orphan(orphans[0]) == 0  # no parts: nothing to free
    assert (await store.get(live.name)).session_id == live.session_id


# -- listing -----------------------------------------------------------------------------


async def test_list_unfinished_reads_records_concurrently_and_stops_cleanly(open_s3):
    store = await open_s3()
    names = [f"list/{i:02d}" for i in range(40)]
    await asyncio.gather(*(create(store, name, None) for name in names))
    await store.finish(await store.write(await create(store, "list/done", 1), stream(b"x")))
    assert sorted([i.name async for i in store.list_unfinished()]) == names

    async with aclosing(store.list_unfinished()) as listing:
        async for _ in listing:
            break
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
