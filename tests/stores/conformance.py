"""The black-box conformance suite every ``Store`` must pass.

Written once against the contract in ``app/stores/base.py`` and run for each
backend by subclassing (``tests/stores/test_conformance.py``), in the style of
fsspec's abstract test suites. The ``store_harness`` fixture gives every test
fresh backing storage; ``harness.open()`` is a new store instance over it, which
is how a restart or a second process is simulated. Finished objects are read
back from the backend itself (the disk, or S3 through boto3), never through the
store under test, so byte-identity is checked independently.

Data stays small (at most ~15 MiB per test) because moto is slow.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import google_crc32c
import pytest

from app.core.protocol import choose_part_size
from app.errors import (
    BadRequest,
    OffsetMismatch,
    TooLarge,
    TotalMismatch,
    UploadNotFound,
)
from app.stores.base import CallbackOutbox, HealthCheck, Store, UploadInfo
from tests.stores.fixtures import StoreHarness

MIB = 1024 * 1024
GIB = 1024 * MIB

ObjectReader = Callable[[str], bytes | None]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def crc(data: bytes) -> int:
    return google_crc32c.value(data)


async def chunked(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def no_chunks() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover - makes this an async generator


async def new_upload(
    store: Store,
    name: str,
    *,
    total: int | None = None,
    content_type: str = "application/octet-stream",
    metadata: dict[str, str] | None = None,
    owner: str | None = None,
) -> UploadInfo:
    return await store.create(
        name, total=total, content_type=content_type, metadata=metadata or {}, owner=owner
    )


async def append(
    store: Store,
    info: UploadInfo,
    data: bytes,
    *,
    chunk_size: int = 64 * 1024,
    total: int | None = None,
) -> UploadInfo:
    return await store.write(info, chunked(data, chunk_size), total=total)


def durable_fields(info: UploadInfo) -> tuple[object, ...]:
    """What must read back identically from any instance (``version`` is opaque)."""
    return (
        info.name,
        info.session_id,
        info.offset,
        info.total,
        info.part_size,
        info.crc32c,
        info.content_type,
        dict(info.metadata),
        info.owner,
        info.created_at,
        info.updated_at,
        info.completed,
    )


class StoreConformance:
    """Subclass as ``TestXxx`` to run the suite; needs the ``store_harness`` fixture."""

    @pytest.fixture
    def read_object(
        self, store_harness: StoreHarness, request: pytest.FixtureRequest
    ) -> ObjectReader:
        """Bytes of the finished object ``name`` straight from the backend, or None."""
        if store_harness.kind == "filesystem":
            root = Path(store_harness.storage.filesystem.root)

            def read_file(name: str) -> bytes | None:
                path = root / name
                return path.read_bytes() if path.is_file() else None

            return read_file

        client = request.getfixturevalue("s3_client")
        s3 = store_harness.storage.s3

        def read_s3(name: str) -> bytes | None:
            try:
                response = client.get_object(Bucket=s3.bucket, Key=s3.prefix + name)
            except client.exceptions.NoSuchKey:
                return None
            return response["Body"].read()

        return read_s3

    # -- creation and state ----------------------------------------------------

    async def test_create_then_get(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        created = await new_upload(store, "a/b.bin", total=1234, content_type="video/mp4")
        assert created.name == "a/b.bin"
        assert created.offset == 0
        assert created.total == 1234
        assert created.crc32c == 0
        assert created.part_size == store_harness.storage.part_size
        assert created.content_type == "video/mp4"
        assert created.completed is None and not created.is_complete
        assert created.session_id
        assert 0 < created.created_at <= created.updated_at
        got = await store.get("a/b.bin")
        assert durable_fields(got) == durable_fields(created)

    async def test_metadata_content_type_owner_round_trip(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        metadata = {"title": "Ünïcødé ✓ title", "x-empty": "", "camera": "EOS R5"}
        info = await new_upload(
            store,
            "meta.bin",
            total=5,
            content_type="video/mp4; codecs=\"avc1.42E01E\"",
            metadata=metadata,
            owner="user-42",
        )
        info = await append(store, info, b"hello")
        for seen in (info, await store.get("meta.bin"), await (await store_harness.open()).get(
            "meta.bin"
        )):
            assert dict(seen.metadata) == metadata
            assert seen.content_type == 'video/mp4; codecs="avc1.42E01E"'
            assert seen.owner == "user-42"
        done = await store.finish(info)
        assert dict(done.metadata) == metadata
        assert done.owner == "user-42"
        assert read_object("meta.bin") == b"hello"

        anonymous = await new_upload(store, "anon.bin")
        assert anonymous.owner is None
        assert dict((await store.get("anon.bin")).metadata) == {}

    async def test_part_size_grows_only_for_huge_totals(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        default = store_harness.storage.part_size
        unknown = await new_upload(store, "unknown.bin")
        assert unknown.part_size == default
        huge_total = 100 * GIB
        huge = await new_upload(store, "huge.bin", total=huge_total)
        assert huge.part_size == choose_part_size(huge_total, default)
        assert huge.part_size * 10_000 >= huge_total

    async def test_total_beyond_any_object_is_too_large(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        # Past 10,000 parts of the largest part, so no store can take it.
        with pytest.raises(TooLarge):
            await new_upload(store, "too-big.bin", total=100 * 1024 * 1024 * GIB)
        with pytest.raises(UploadNotFound):
            await store.get("too-big.bin")

    async def test_unknown_upload_is_not_found(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        ghost = UploadInfo(
            name="never/created.bin",
            session_id="0" * 32,
            offset=0,
            total=None,
            part_size=store_harness.storage.part_size,
            crc32c=0,
            content_type="application/octet-stream",
        )
        with pytest.raises(UploadNotFound):
            await store.get(ghost.name)
        with pytest.raises(UploadNotFound):
            await store.write(ghost, chunked(b"data"))
        with pytest.raises(UploadNotFound):
            await store.finish(ghost)
        with pytest.raises(UploadNotFound):
            await store.cancel(ghost.name)

    # -- appends -----------------------------------------------------------------

    async def test_tiny_appends_are_counted_at_once(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        """A store must not hold back bytes below some minimum of its own."""
        store = await store_harness.open()
        data = payload(2 * 64 + 2 * 300, seed=1)
        info = await new_upload(store, "tiny.bin")
        for i in range(64):
            info = await append(store, info, data[2 * i : 2 * i + 2])
            assert info.offset == 2 * (i + 1)
            assert info.crc32c == crc(data[: info.offset])
        assert (await store.get("tiny.bin")).offset == 128
        info = await append(store, info, data[128:], chunk_size=2, total=len(data))
        assert info.offset == info.total == len(data)
        restarted = await (await store_harness.open()).get("tiny.bin")
        assert restarted.offset == len(data)
        assert restarted.crc32c == crc(data)
        done = await store.finish(info)
        assert done.completed is not None and done.completed.size == len(data)
        assert read_object("tiny.bin") == data

    async def test_appends_across_part_boundaries_and_a_restart(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        part = 5 * MIB
        data = payload(13 * MIB + 7, seed=2)
        cuts = [0, 1 * MIB, part + 1, 2 * part, len(data)]
        first = await store_harness.open_with(part_size=part)
        info = await new_upload(first, "parts/video.bin", total=len(data))
        assert info.part_size == part
        for start, end in pairwise(cuts[:3]):
            info = await append(first, info, data[start:end], chunk_size=300_001)
            assert info.offset == end
            assert info.crc32c == crc(data[:end])
        # A second process picks up the upload after a part boundary was crossed.
        second = await store_harness.open_with(part_size=part)
        info = await second.get("parts/video.bin")
        assert info.offset == cuts[2]
        assert info.part_size == part
        for start, end in pairwise(cuts[2:]):
            info = await append(second, info, data[start:end], chunk_size=1 * MIB + 3)
            assert info.offset == end
        assert info.crc32c == crc(data)
        done = await second.finish(info)
        assert done.completed is not None
        assert done.completed.size == len(data)
        assert done.completed.crc32c == crc(data)
        assert read_object("parts/video.bin") == data

    async def test_crc32c_after_many_appends(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        rng = random.Random(3)
        data = payload(300_000, seed=3)
        info = await new_upload(store, "crc.bin", total=len(data))
        while info.offset < len(data):
            step = min(rng.randint(1, 20_000), len(data) - info.offset)
            info = await append(
                store, info, data[info.offset : info.offset + step], chunk_size=rng.randint(1, 4096)
            )
            assert info.crc32c == crc(data[: info.offset])
        assert (await store.get("crc.bin")).crc32c == crc(data)
        done = await store.finish(info)
        assert done.completed is not None
        assert done.completed.crc32c == crc(data)
        assert done.completed.size == len(data)
        assert done.crc32c == crc(data)
        assert read_object("crc.bin") == data

    async def test_empty_write_changes_nothing(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        info = await append(store, await new_upload(store, "e.bin"), b"abc")
        after = await store.write(info, no_chunks())
        assert (after.offset, after.crc32c, after.total) == (3, crc(b"abc"), None)
        assert (await store.get("e.bin")).offset == 3

    async def test_resume_at_the_stored_offset(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        data = payload(100_000, seed=4)
        info = await new_upload(store, "resume.bin", total=len(data))
        await append(store, info, data[:40_000])
        probed = await store.get("resume.bin")
        assert probed.offset == 40_000
        probed = await append(store, probed, data[probed.offset :])
        assert probed.offset == len(data)
        await store.finish(probed)
        assert read_object("resume.bin") == data

    async def test_wrong_offset_is_refused_and_writes_nothing(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        data = payload(30, seed=5)
        info = await append(store, await new_upload(store, "off.bin", total=30), data[:10])
        for wrong in (0, 5, 11, 20):
            stale = replace(info, offset=wrong)
            with pytest.raises(OffsetMismatch) as caught:
                await append(store, stale, b"X" * 10)
            assert caught.value.offset == 10
            now = await store.get("off.bin")
            assert (now.offset, now.crc32c) == (10, crc(data[:10]))
        info = await append(store, await store.get("off.bin"), data[10:])
        await store.finish(info)
        assert read_object("off.bin") == data

    async def test_a_stale_instance_gets_offset_mismatch(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        """Another process that got there first is seen through the backing storage."""
        first = await store_harness.open()
        second = await store_harness.open()
        data = payload(20_000, seed=6)
        info = await append(first, await new_upload(first, "race.bin"), data[:5_000])
        theirs = await second.get("race.bin")
        await append(second, theirs, data[5_000:12_000])
        with pytest.raises(OffsetMismatch) as caught:
            await append(first, info, b"Z" * 100)
        assert caught.value.offset == 12_000
        info = await first.get("race.bin")
        assert info.offset == 12_000
        info = await append(first, info, data[12_000:], total=len(data))
        await first.finish(info)
        assert read_object("race.bin") == data

    # -- totals --------------------------------------------------------------------

    async def test_unknown_total_is_settled_by_the_last_write(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        data = payload(50_000, seed=7)
        info = await new_upload(store, "open-ended.bin")
        info = await append(store, info, data[:30_000])
        assert info.total is None
        info = await append(store, info, data[30_000:], total=len(data))
        assert info.total == info.offset == len(data)
        assert (await (await store_harness.open()).get("open-ended.bin")).total == len(data)
        done = await store.finish(info)
        assert done.completed is not None and done.completed.size == len(data)
        assert read_object("open-ended.bin") == data

    async def test_total_can_be_settled_without_bytes(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        info = await append(store, await new_upload(store, "settle.bin"), b"0123456789")
        info = await store.write(info, no_chunks(), total=20)
        assert (info.offset, info.total) == (10, 20)
        assert (await store.get("settle.bin")).total == 20

    async def test_contradicting_total_is_refused(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        known = await new_upload(store, "known.bin", total=100)
        with pytest.raises(TotalMismatch):
            await append(store, known, b"a" * 10, total=99)
        state = await store.get("known.bin")
        assert (state.offset, state.total) == (0, 100)
        # Restating the same total is not a contradiction.
        state = await append(store, state, b"a" * 10, total=100)
        assert (state.offset, state.total) == (10, 100)

        unknown = await append(store, await new_upload(store, "unknown.bin"), b"b" * 50)
        with pytest.raises(TotalMismatch):
            await append(store, unknown, b"", total=40)
        state = await store.get("unknown.bin")
        assert (state.offset, state.total, state.crc32c) == (50, None, crc(b"b" * 50))

    # -- partial streams -------------------------------------------------------------

    @pytest.mark.parametrize("before_failure", [30_000, 6 * MIB + 12_345])
    async def test_a_failing_stream_keeps_the_bytes_before_the_failure(
        self, store_harness: StoreHarness, read_object: ObjectReader, before_failure: int
    ) -> None:
        store = await store_harness.open()
        data = payload(before_failure + 1000, seed=8)

        async def broken() -> AsyncIterator[bytes]:
            async for chunk in chunked(data[:before_failure], 1 * MIB):
                yield chunk
            raise ConnectionResetError("client went away")

        info = await new_upload(store, "broken.bin", total=len(data))
        with pytest.raises(ConnectionResetError):
            await store.write(info, broken())
        kept = await (await store_harness.open()).get("broken.bin")
        assert kept.offset == before_failure
        assert kept.crc32c == crc(data[:before_failure])
        kept = await append(store, kept, data[before_failure:])
        await store.finish(kept)
        assert read_object("broken.bin") == data

    async def test_a_stream_that_ends_early_keeps_what_arrived(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        data = payload(20_000, seed=9)
        info = await new_upload(store, "short.bin", total=len(data))
        info = await append(store, info, data[:12_345])  # the client meant to send it all
        assert info.offset == 12_345
        with pytest.raises(BadRequest):
            await store.finish(info)
        info = await append(store, await store.get("short.bin"), data[12_345:])
        await store.finish(info)
        assert read_object("short.bin") == data

    async def test_a_cancelled_write_keeps_what_arrived(self, store_harness: StoreHarness) -> None:
        """A writer cancelled mid-body (server shutdown, a caller's timeout) sees
        CancelledError raised out of the chunks iterable: like any exception
        from the stream, the bytes before it are kept."""
        store = await store_harness.open()
        data = payload(3_000, seed=10)
        info = await new_upload(store, "cancelled.bin")
        sent = asyncio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield data[:1_000]
            yield data[1_000:]
            sent.set()
            await asyncio.Event().wait()
            yield b"never"

        task = asyncio.create_task(store.write(info, stalled()))
        await asyncio.wait_for(sent.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        kept = await store.get("cancelled.bin")
        assert (kept.offset, kept.crc32c) == (3_000, crc(data))

    # -- finishing -------------------------------------------------------------------

    async def test_finish_is_idempotent(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        data = payload(10_000, seed=11)
        info = await append(store, await new_upload(store, "twice.bin", total=len(data)), data)
        first = await store.finish(info)
        assert first.is_complete and first.completed is not None
        assert first.completed.size == len(data)
        assert first.completed.etag
        again = await store.finish(info)
        assert again.completed == first.completed
        assert (await store.finish(first)).completed == first.completed
        assert (await store.get("twice.bin")).completed == first.completed
        restarted = await store_harness.open()
        assert (await restarted.finish(info)).completed == first.completed
        assert read_object("twice.bin") == data

    async def test_finish_records_the_given_md5(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        data = b"digest me"
        info = await append(store, await new_upload(store, "md5.bin", total=len(data)), data)
        digest = hashlib.md5(data).digest()
        done = await store.finish(info, md5=digest)
        assert done.completed is not None and done.completed.md5 == digest
        assert (await store.get("md5.bin")).completed == done.completed

    async def test_finish_before_all_bytes_is_refused(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        data = payload(1_000, seed=12)
        info = await append(store, await new_upload(store, "early.bin", total=1_000), data[:600])
        with pytest.raises(BadRequest):
            await store.finish(info)
        state = await store.get("early.bin")
        assert (state.offset, state.crc32c, state.completed) == (600, crc(data[:600]), None)
        assert read_object("early.bin") is None

        open_ended = await append(store, await new_upload(store, "open.bin"), data)
        with pytest.raises(BadRequest):
            await store.finish(open_ended)
        assert (await store.get("open.bin")).completed is None

        state = await append(store, state, data[600:])
        await store.finish(state)
        assert read_object("early.bin") == data

    @pytest.mark.parametrize("settle_late", [False, True])
    async def test_zero_length_upload(
        self, store_harness: StoreHarness, read_object: ObjectReader, settle_late: bool
    ) -> None:
        store = await store_harness.open()
        info = await new_upload(store, "empty.bin", total=None if settle_late else 0)
        if settle_late:
            info = await store.write(info, no_chunks(), total=0)
        assert (info.offset, info.total) == (0, 0)
        done = await store.finish(info)
        assert done.completed is not None
        assert (done.completed.size, done.completed.crc32c) == (0, 0)
        assert read_object("empty.bin") == b""

    async def test_write_after_finish_is_not_found(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        info = await new_upload(store, "closed.bin", total=0)
        await store.finish(info)
        with pytest.raises(UploadNotFound):
            await store.write(info, chunked(b"more"))

    async def test_nested_and_unicode_names(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        name = "dir/sub dir/ünïcødé 📦 (1).bin"
        info = await append(store, await new_upload(store, name, total=4), b"\x00\x01\x02\x03")
        done = await store.finish(info)
        assert done.completed is not None and done.completed.key.endswith(name)
        assert read_object(name) == b"\x00\x01\x02\x03"

    # -- replacing and cancelling ---------------------------------------------------------

    async def test_create_replaces_an_unfinished_upload(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        old = await append(store, await new_upload(store, "again.bin"), b"old bytes" * 100)
        new = await new_upload(store, "again.bin", total=3, metadata={"v": "2"})
        assert new.session_id != old.session_id
        assert (new.offset, new.crc32c, new.total) == (0, 0, 3)
        with pytest.raises((OffsetMismatch, UploadNotFound)):
            await append(store, old, b"stale writer")
        assert (await store.get("again.bin")).offset == 0
        new = await append(store, new, b"new")
        done = await store.finish(new)
        assert dict(done.metadata) == {"v": "2"}
        assert read_object("again.bin") == b"new"

    async def test_a_replaced_object_stays_until_the_new_upload_finishes(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        await store.finish(await append(store, await new_upload(store, "v.txt", total=2), b"v1"))
        info = await append(store, await new_upload(store, "v.txt", total=4), b"v2")
        assert (await store.get("v.txt")).completed is None
        assert read_object("v.txt") == b"v1"
        await store.finish(await append(store, info, b"v2"))
        assert read_object("v.txt") == b"v2v2"

    async def test_cancel_discards_the_upload(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        info = await append(store, await new_upload(store, "gone.bin", total=10), b"12345")
        await store.cancel("gone.bin")
        with pytest.raises(UploadNotFound):
            await store.get("gone.bin")
        with pytest.raises(UploadNotFound):
            await (await store_harness.open()).get("gone.bin")
        with pytest.raises(UploadNotFound):
            await append(store, info, b"67890")
        with pytest.raises(UploadNotFound):
            await store.cancel("gone.bin")
        assert read_object("gone.bin") is None
        fresh = await new_upload(store, "gone.bin")
        assert (fresh.offset, fresh.crc32c) == (0, 0)

    async def test_cancel_of_a_finished_upload_keeps_the_object(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        info = await append(store, await new_upload(store, "keep.bin", total=4), b"keep")
        await store.finish(info)
        await store.cancel("keep.bin")
        with pytest.raises(UploadNotFound):
            await store.get("keep.bin")
        assert read_object("keep.bin") == b"keep"

    async def test_list_unfinished_lists_only_unfinished_uploads(
        self, store_harness: StoreHarness
    ) -> None:
        store = await store_harness.open()
        written = await append(store, await new_upload(store, "l/written.bin"), b"x" * 100)
        await new_upload(store, "l/cancelled.bin")
        await store.cancel("l/cancelled.bin")
        await store.finish(await new_upload(store, "l/finished.bin", total=0))
        idle = await new_upload(store, "l/idle.bin", total=10)

        for instance in (store, await store_harness.open()):
            found = {info.name: info async for info in instance.list_unfinished()}
            assert set(found) == {"l/written.bin", "l/idle.bin"}
            assert found["l/written.bin"].offset == 100
            assert found["l/written.bin"].session_id == written.session_id
            assert found["l/written.bin"].updated_at >= written.created_at > 0
            assert found["l/idle.bin"].updated_at == pytest.approx(idle.updated_at)
            assert all(info.completed is None for info in found.values())

    async def test_cancel_of_a_replaced_session_changes_nothing(
        self, store_harness: StoreHarness
    ) -> None:
        store = await store_harness.open()
        old = await new_upload(store, "swap.bin")
        new = await append(store, await new_upload(store, "swap.bin"), b"new bytes")
        with pytest.raises(UploadNotFound):
            await store.cancel("swap.bin", session_id=old.session_id)
        current = await store.get("swap.bin")
        assert (current.session_id, current.offset) == (new.session_id, len(b"new bytes"))
        await store.cancel("swap.bin", session_id=new.session_id)
        with pytest.raises(UploadNotFound):
            await store.get("swap.bin")

    async def test_list_completed_lists_only_completed_uploads(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        await append(store, await new_upload(store, "c/unfinished.bin"), b"x" * 10)
        done = await store.finish(
            await append(store, await new_upload(store, "c/done.bin", total=4), b"done")
        )
        for instance in (store, await store_harness.open()):
            found = {info.name: info async for info in instance.list_completed()}
            assert set(found) == {"c/done.bin"}
            assert found["c/done.bin"].completed == done.completed
        # Forgetting the record keeps the object.
        await store.cancel("c/done.bin", session_id=done.session_id)
        assert [info async for info in store.list_completed()] == []
        assert read_object("c/done.bin") == b"done"

    async def test_uploads_of_different_names_run_concurrently(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        datas = {f"c/{i}.bin": payload(200_000 + i, seed=20 + i) for i in range(4)}

        async def one(name: str, data: bytes) -> None:
            info = await new_upload(store, name, total=len(data))
            for start in range(0, len(data), 50_000):
                info = await append(store, info, data[start : start + 50_000], chunk_size=7_000)
                await asyncio.sleep(0)
            await store.finish(info)

        await asyncio.gather(*(one(name, data) for name, data in datas.items()))
        for name, data in datas.items():
            assert read_object(name) == data

    # -- restarts ----------------------------------------------------------------------

    async def test_state_survives_a_restart(
        self, store_harness: StoreHarness, read_object: ObjectReader
    ) -> None:
        store = await store_harness.open()
        data = payload(70_000, seed=13)
        info = await new_upload(store, "restart.bin", metadata={"k": "v"}, owner="o")
        info = await append(store, info, data[:33_333])
        await store.close()

        second = await store_harness.open()
        assert durable_fields(await second.get("restart.bin")) == durable_fields(info)
        info = await append(second, await second.get("restart.bin"), data[33_333:], total=70_000)
        done = await second.finish(info)

        third = await store_harness.open()
        assert durable_fields(await third.get("restart.bin")) == durable_fields(done)
        assert read_object("restart.bin") == data

    # -- optional capabilities -----------------------------------------------------------

    async def test_health_check(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        if not isinstance(store, HealthCheck):
            pytest.skip(f"{type(store).__name__} does not offer HealthCheck")
        assert await store.check_health() is None

    async def test_callback_outbox(self, store_harness: StoreHarness) -> None:
        store = await store_harness.open()
        if not isinstance(store, CallbackOutbox):
            pytest.skip(f"{type(store).__name__} does not offer CallbackOutbox")
        binary = bytes(range(256))
        assert await store.list_pending() == []
        await store.save_pending("cb-1", b'{"name": "a"}')
        await store.save_pending("cb/2 odd id", binary)
        await store.save_pending("cb-1", b'{"name": "a", "retry": 1}')
        again = await store_harness.open()
        assert isinstance(again, CallbackOutbox)
        assert sorted(await again.list_pending()) == sorted(
            [("cb-1", b'{"name": "a", "retry": 1}'), ("cb/2 odd id", binary)]
        )
        await again.delete_pending("cb-1")
        await again.delete_pending("cb-1")
        await again.delete_pending("never-saved")
        assert await store.list_pending() == [("cb/2 odd id", binary)]
