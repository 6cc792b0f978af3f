"""The library against the real server on both stores: whole files, chunks,
streams of unknown length, the writer, session URLs."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import google_crc32c
import pytest

from app.client import (
    Completed,
    OffsetError,
    Progress,
    ResumableWriter,
    resume,
    upload,
    upload_events,
    upload_sync,
)
from app.client.core import crc_b64
from tests.client.support import KIB, MIB, data_of, stored


async def test_whole_file_from_a_path(proxy, store_harness, tmp_path: Path) -> None:
    data = data_of(7 * MIB + 13)
    path = tmp_path / "a.bin"
    path.write_bytes(data)
    events: list[object] = []
    result = await upload(f"{proxy.url}/upload/files/a.bin", path, on_progress=events.append)
    assert result["size"] == len(data)
    assert result["crc32c"] == crc_b64(google_crc32c.value(data))
    assert await stored(store_harness, "files/a.bin") == data
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1].sent == len(data) and progress[-1].total == len(data)
    assert isinstance(events[-1], Completed) and events[-1].result == result


async def test_chunks_from_bytes_and_file_object(proxy, store_harness) -> None:
    data = data_of(3 * MIB + 5)
    for name, source in (("c/bytes.bin", data), ("c/file.bin", io.BytesIO(data))):
        result = await upload(f"{proxy.url}/upload/{name}", source, chunk_size=512 * KIB)
        assert result["size"] == len(data)
        assert await stored(store_harness, name) == data


async def test_async_iterator_of_unknown_length(proxy, store_harness) -> None:
    data = data_of(2 * MIB + 100_000)

    async def pieces():
        for i in range(0, len(data), 100_000):
            yield data[i:i + 100_000]

    result = await upload(f"{proxy.url}/upload/s/stream.bin", pieces(), chunk_size=512 * KIB)
    assert result["size"] == len(data)
    assert await stored(store_harness, "s/stream.bin") == data
    # A stated total goes in every chunk's range instead of "*".
    events: list[object] = []
    result = await upload(f"{proxy.url}/upload/s/known.bin", pieces(), total=len(data),
                          on_progress=events.append)
    assert result["size"] == len(data)
    assert all(e.total == len(data) for e in events if isinstance(e, Progress))


async def test_stream_ending_on_a_chunk_boundary_and_empty(proxy, store_harness) -> None:
    data = data_of(MIB)

    async def pieces(blob: bytes):
        if blob:
            yield blob

    result = await upload(f"{proxy.url}/upload/s/exact.bin", pieces(data), chunk_size=256 * KIB)
    assert result["size"] == MIB
    assert await stored(store_harness, "s/exact.bin") == data
    result = await upload(f"{proxy.url}/upload/s/empty.bin", pieces(b""))
    assert result["size"] == 0
    result = await upload(f"{proxy.url}/upload/s/empty2.bin", b"")
    assert result["size"] == 0


async def test_writer(proxy, store_harness) -> None:
    data = data_of(MIB + 777)
    async with ResumableWriter(f"{proxy.url}/upload/w/out.bin", chunk_size=256 * KIB) as w:
        for i in range(0, len(data), 10_000):
            await w.write(data[i:i + 10_000])
    assert w.result is not None and w.result["size"] == len(data)
    assert w.result["crc32c"] == crc_b64(google_crc32c.value(data))
    assert await stored(store_harness, "w/out.bin") == data


async def test_events_iterator_and_sync_wrapper(proxy, store_harness) -> None:
    data = data_of(600 * KIB)
    events = [e async for e in upload_events(f"{proxy.url}/upload/e/a.bin", data,
                                             chunk_size=256 * KIB)]
    assert isinstance(events[-1], Completed) and events[-1].size == len(data)
    assert [e.acknowledged for e in events if isinstance(e, Progress)][-1] == 512 * KIB
    result = await asyncio.to_thread(upload_sync, f"{proxy.url}/upload/e/b.bin", data)
    assert result["size"] == len(data)
    assert await stored(store_harness, "e/b.bin") == data


async def test_resume_refuses_a_server_that_moved_on(proxy) -> None:
    """A saved state whose offset the server no longer agrees with is refused."""
    url = f"{proxy.url}/upload/e/moved.bin"
    data = data_of(MIB)
    async with ResumableWriter(url, chunk_size=256 * KIB) as w:
        await w.write(data[:300 * KIB])
        old = await w.pause()
    async with ResumableWriter(url, state=old) as w:
        await w.write(data[old.offset:600 * KIB])
        await w.pause()
    with pytest.raises(OffsetError, match="sent only 262144"):
        await resume(old, data)
