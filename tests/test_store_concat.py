"""The joining capabilities (app/stores/concat.py) on both stores, black-box:
finished objects joined in the store (Concatenation) or read back
(ObjectReader), what a changed or missing source does, and restarts."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import google_crc32c
import pytest

from app.core.model import CompletedObject, UploadInfo
from app.errors import OffsetMismatch, UploadNotFound
from app.stores.base import Store
from app.stores.concat import concatenation_for, reader_for
from tests.stores.fixtures import StoreHarness
from tests.test_http import stored_object

MIB = 1024 * 1024


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def finished(store: Store, name: str, data: bytes) -> CompletedObject:
    info = await store.create(name, total=len(data), content_type="application/octet-stream",
                              metadata={}, owner=None)
    info = await store.write(info, chunks(data))
    done = (await store.finish(info)).completed
    assert done is not None
    return done


async def empty_session(store: Store, name: str, total: int, target: str) -> UploadInfo:
    return await store.create(name, total=total, content_type="video/mp4",
                              metadata={"k": "v"}, owner="u1", target=target)


async def test_join_assembles_in_the_store(store_harness: StoreHarness) -> None:
    store = await store_harness.open()
    joiner = concatenation_for(store)
    assert joiner is not None
    pieces = [os.urandom(5 * MIB + 1), os.urandom(6 * MIB), os.urandom(123)]
    sources = [await finished(store, f"parts/{i}", p) for i, p in enumerate(pieces)]
    assert joiner.can_join(sources)
    whole = b"".join(pieces)
    info = await empty_session(store, ".uploads/ids/tus/" + "a" * 22, len(whole), "joined.bin")
    done = await joiner.join(info, sources)
    assert done.completed is not None
    assert done.completed.size == done.offset == len(whole)
    assert done.completed.crc32c == done.crc32c == google_crc32c.value(whole)
    assert done.object_name == "joined.bin" and done.owner == "u1"
    assert await stored_object(store_harness, "joined.bin") == whole
    # Durable: a new store instance sees the completed session.
    again = await (await store_harness.open()).get(info.name)
    assert again.completed == done.completed
    # The sources stay as they were.
    assert await stored_object(store_harness, "parts/1") == pieces[1]


async def test_small_parts_are_for_the_reader_on_s3(store_harness: StoreHarness) -> None:
    store = await store_harness.open()
    joiner, reader = concatenation_for(store), reader_for(store)
    assert joiner is not None and reader is not None
    pieces = [os.urandom(1000), os.urandom(MIB), b"z"]
    sources = [await finished(store, f"small/{i}", p) for i, p in enumerate(pieces)]
    assert joiner.can_join(sources) is (store_harness.kind == "filesystem")
    read = b"".join([b"".join([d async for d in reader.read_object(s)]) for s in sources])
    assert read == b"".join(pieces)


async def test_join_refuses_a_changed_or_missing_source(store_harness: StoreHarness) -> None:
    store = await store_harness.open()
    joiner = concatenation_for(store)
    assert joiner is not None
    old = await finished(store, "changing.bin", os.urandom(5 * MIB))
    tail = await finished(store, "tail.bin", b"tail")
    # Replaced by another upload of the same name (and another size).
    await finished(store, "changing.bin", os.urandom(5 * MIB + 10))
    info = await empty_session(store, ".uploads/ids/tus/" + "b" * 22, old.size + 4, "out.bin")
    with pytest.raises(OffsetMismatch):
        await joiner.join(info, [old, tail])
    gone = CompletedObject(key=tail.key.replace("tail.bin", "never.bin"), bucket=tail.bucket,
                           size=4, etag=tail.etag, crc32c=tail.crc32c, completed_at=0.0)
    info = await empty_session(store, ".uploads/ids/tus/" + "c" * 22, 8, "out2.bin")
    with pytest.raises(UploadNotFound):
        await joiner.join(info, [gone, tail])
    reader = reader_for(store)
    assert reader is not None
    with pytest.raises(OffsetMismatch):
        async for _ in reader.read_object(old):
            pass


async def test_join_refuses_a_session_that_moved(store_harness: StoreHarness) -> None:
    store = await store_harness.open()
    joiner = concatenation_for(store)
    assert joiner is not None
    source = await finished(store, "src.bin", os.urandom(1000))
    info = await empty_session(store, ".uploads/ids/tus/" + "d" * 22, 1000, "dst.bin")
    await store.write(info, chunks(b"x"))
    with pytest.raises(OffsetMismatch):
        await joiner.join(info, [source])
