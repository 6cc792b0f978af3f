"""S3-specific behaviour of ``S3Store`` against a real moto server over HTTP.

The generic Store contract is checked by the shared conformance suite; these
tests look at what only S3 has: parts, staged objects, conditional records,
part-size arithmetic, a backend cut mid-write, and what lands in the bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import google_crc32c
import pytest

from app.config import Config
from app.config import replace as config_replace
from app.errors import OffsetMismatch, StorageUnavailable, TooLarge, TotalMismatch
from app.protocol import MAX_OBJECT_SIZE, MAX_PARTS, MIB
from app.stores.base import CallbackOutbox, HealthCheck, UploadInfo
from app.stores.s3 import S3Store
from tests.stores.fixtures import storage_config

P = 5 * MIB
PREFIX = "uploads/"

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


async def test_many_small_writes_fold_staged_segments(open_s3, s3_client, bucket):
    store = await open_s3()
    data = payload(40 * 1000 + P)
    info = await create(store, "small.bin", len(data))
    for i in range(40):
        info = await store.write(info, stream(data[i * 1000 : (i + 1) * 1000]))
    # Segments were folded, so the tail is a handful of objects, not 40.
    assert len(keys(s3_client, bucket, staged_prefix(info.session_id))) < 40
    fresh = await open_s3()  # cannot use this process's cache
    info = await fresh.get("small.bin")
    assert info.offset == 40_000 and info.crc32c == google_crc32c.value(data[:40_000])
    info = await fresh.write(info, stream(data[40_000:]))
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

    # A crash between CompleteMultipartUpload and the record update: the MPU is
    # gone, the record still says unfinished. The object's session tag settles it.
    s3_client.put_object(Bucket=bucket, Key=record_key, Body=unfinished_record)
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

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[:MIB]
        await a_done.wait()  # A advances the upload while B is mid-request

    b_write = asyncio.create_task(b.write(info, slow_body()))
    await asyncio.sleep(0.3)  # B has read the record and is streaming
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

    async def body() -> AsyncIterator[bytes]:
        sent = MIB
        while sent < len(data):
            yield data[sent : sent + MIB]
            sent += MIB
            if sent == 3 * P:
                await asyncio.sleep(1.0)  # let the first parts land
                await asyncio.to_thread(relay.stop)

    with pytest.raises(StorageUnavailable):
        await cut.write(info, body())

    await asyncio.to_thread(relay.start)
    store = await open_s3()
    info = await store.get("cut.bin")
    assert info.offset in (MIB, P, 2 * P, 3 * P)
    assert info.offset >= P  # parts that landed before the cut were recorded
    assert info.crc32c == google_crc32c.value(data[: info.offset])
    info = await store.write(info, stream(data[info.offset :]))
    await store.finish(info)
    assert read_object(s3_client, bucket, "cut.bin") == data


async def test_s3_down_at_write_start_is_storage_unavailable(open_s3, relay):
    store = await open_s3(endpoint=relay.url, s3={"max_attempts": 1})
    info = await create(store, "down.bin", None)
    await asyncio.to_thread(relay.stop)
    with pytest.raises(StorageUnavailable) as caught:
        await store.write(info, stream(b"x" * 100))
    assert "GetObject" in caught.value.message
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


async def test_a_write_cancelled_anywhere_leaks_nothing(open_s3):
    store = await open_s3(parts_in_flight=1)
    data = payload(4 * P, seed=4)
    info = await create(store, "cancel.bin", len(data))
    write = asyncio.create_task(store.write(info, stream(data, chunk=MIB)))
    await asyncio.sleep(0.15)  # some parts in flight, the loop waiting for a slot
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    assert store.buffered_bytes == 0
    info = await store.get("cancel.bin")
    assert info.offset % P == 0  # only whole, recorded parts count
    assert info.crc32c == google_crc32c.value(data[: info.offset])
    info = await store.write(info, stream(data[info.offset :]))
    await store.finish(info)


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
