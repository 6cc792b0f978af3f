"""Appending bytes: offsets, CRC32C, totals, partial and failing streams."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from app.errors import BadRequest, OffsetMismatch, TotalMismatch
from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.helpers import (
    MIB,
    append,
    chunked,
    crc,
    new_upload,
    no_chunks,
    payload,
)


class WriteTests(KitTests):
    async def test_tiny_appends_are_counted_at_once(self, harness: Harness) -> None:
        """A store must not hold back bytes below some minimum of its own."""
        store = await harness.open()
        data = payload(2 * 64 + 2 * 300, seed=1)
        info = await new_upload(store, "tiny.bin")
        for i in range(64):
            info = await append(store, info, data[2 * i : 2 * i + 2])
            assert info.offset == 2 * (i + 1)
            assert info.crc32c == crc(data[: info.offset])
        assert (await store.get("tiny.bin")).offset == 128
        info = await append(store, info, data[128:], chunk_size=2, total=len(data))
        assert info.offset == info.total == len(data)
        restarted = await (await harness.open()).get("tiny.bin")
        assert restarted.offset == len(data)
        assert restarted.crc32c == crc(data)
        done = await store.finish(info)
        assert done.completed is not None and done.completed.size == len(data)
        assert harness.read_object("tiny.bin") == data

    async def test_crc32c_after_many_appends(self, harness: Harness) -> None:
        store = await harness.open()
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
        assert harness.read_object("crc.bin") == data

    async def test_empty_write_changes_nothing(self, harness: Harness) -> None:
        store = await harness.open()
        info = await append(store, await new_upload(store, "e.bin"), b"abc")
        after = await store.write(info, no_chunks())
        assert (after.offset, after.crc32c, after.total) == (3, crc(b"abc"), None)
        assert (await store.get("e.bin")).offset == 3

    async def test_resume_at_the_stored_offset(self, harness: Harness) -> None:
        store = await harness.open()
        data = payload(100_000, seed=4)
        info = await new_upload(store, "resume.bin", total=len(data))
        await append(store, info, data[:40_000])
        probed = await store.get("resume.bin")
        assert probed.offset == 40_000
        probed = await append(store, probed, data[probed.offset :])
        assert probed.offset == len(data)
        await store.finish(probed)
        assert harness.read_object("resume.bin") == data

    async def test_wrong_offset_is_refused_and_writes_nothing(self, harness: Harness) -> None:
        store = await harness.open()
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
        assert harness.read_object("off.bin") == data

    async def test_unknown_total_is_settled_by_the_last_write(self, harness: Harness) -> None:
        store = await harness.open()
        data = payload(50_000, seed=7)
        info = await new_upload(store, "open-ended.bin")
        info = await append(store, info, data[:30_000])
        assert info.total is None
        info = await append(store, info, data[30_000:], total=len(data))
        assert info.total == info.offset == len(data)
        assert (await (await harness.open()).get("open-ended.bin")).total == len(data)
        done = await store.finish(info)
        assert done.completed is not None and done.completed.size == len(data)
        assert harness.read_object("open-ended.bin") == data

    async def test_total_can_be_settled_without_bytes(self, harness: Harness) -> None:
        store = await harness.open()
        info = await append(store, await new_upload(store, "settle.bin"), b"0123456789")
        info = await store.write(info, no_chunks(), total=20)
        assert (info.offset, info.total) == (10, 20)
        assert (await store.get("settle.bin")).total == 20

    async def test_contradicting_total_is_refused(self, harness: Harness) -> None:
        store = await harness.open()
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

    @pytest.mark.parametrize("before_failure", [30_000, 6 * MIB + 12_345])
    async def test_a_failing_stream_keeps_the_bytes_before_the_failure(
        self, harness: Harness, before_failure: int
    ) -> None:
        store = await harness.open()
        data = payload(before_failure + 1000, seed=8)

        async def broken() -> AsyncIterator[bytes]:
            async for chunk in chunked(data[:before_failure], 1 * MIB):
                yield chunk
            raise ConnectionResetError("client went away")

        info = await new_upload(store, "broken.bin", total=len(data))
        with pytest.raises(ConnectionResetError):
            await store.write(info, broken())
        kept = await (await harness.open()).get("broken.bin")
        assert kept.offset == before_failure
        assert kept.crc32c == crc(data[:before_failure])
        kept = await append(store, kept, data[before_failure:])
        await store.finish(kept)
        assert harness.read_object("broken.bin") == data

    async def test_a_stream_that_ends_early_keeps_what_arrived(self, harness: Harness) -> None:
        store = await harness.open()
        data = payload(20_000, seed=9)
        info = await new_upload(store, "short.bin", total=len(data))
        info = await append(store, info, data[:12_345])  # the client meant to send it all
        assert info.offset == 12_345
        with pytest.raises(BadRequest):
            await store.finish(info)
        info = await append(store, await store.get("short.bin"), data[12_345:])
        await store.finish(info)
        assert harness.read_object("short.bin") == data

    async def test_a_cancelled_write_keeps_what_arrived(self, harness: Harness) -> None:
        """A writer cancelled mid-body (server shutdown, a caller's timeout) sees
        CancelledError raised out of the chunks iterable: like any exception
        from the stream, the bytes before it are kept."""
        store = await harness.open()
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

    async def test_uploads_of_different_names_run_concurrently(self, harness: Harness) -> None:
        store = await harness.open()
        datas = {f"c/{i}.bin": payload(200_000 + i, seed=20 + i) for i in range(4)}

        async def one(name: str, data: bytes) -> None:
            info = await new_upload(store, name, total=len(data))
            for start in range(0, len(data), 50_000):
                info = await append(store, info, data[start : start + 50_000], chunk_size=7_000)
                await asyncio.sleep(0)
            await store.finish(info)

        await asyncio.gather(*(one(name, data) for name, data in datas.items()))
        for name, data in datas.items():
            assert harness.read_object(name) == data
