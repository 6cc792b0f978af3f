"""Joining finished objects (``Concatenation``) and reading them back
(``ObjectReader``): the capabilities behind tus concatenation. A store that
lacks one has its tests skipped with the reason.

Sources are big enough (all but the last at least 5 MiB) that every store
that can join at all must accept them; what ``can_join`` answers for smaller
ones is the store's business, but whatever it accepts must come out right.
"""

from __future__ import annotations

import pytest

from app.core.protocol import id_session_name
from app.errors import OffsetMismatch, UploadNotFound
from app.stores.base import CompletedObject, Concatenation, ObjectReader, Store, UploadInfo
from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.helpers import MIB, append, crc, durable_fields, new_upload, payload


async def finished(store: Store, name: str, data: bytes) -> CompletedObject:
    info = await append(store, await new_upload(store, name, total=len(data)), data,
                        chunk_size=MIB)
    done = (await store.finish(info)).completed
    assert done is not None
    return done


async def empty_session(store: Store, upload_id: str, total: int, target: str) -> UploadInfo:
    return await store.create(id_session_name("kit", upload_id), total=total,
                              content_type="video/mp4", metadata={"k": "v"}, owner="u1",
                              target=target)


async def read_all(reader: ObjectReader, done: CompletedObject) -> bytes:
    return b"".join([data async for data in reader.read_object(done)])


async def joining_store(harness: Harness) -> tuple[Store, Concatenation]:
    """A new store and, the same object, its ``Concatenation`` (else a skip)."""
    store = await harness.open()
    if not isinstance(store, Concatenation):
        pytest.skip(f"{type(store).__name__} does not offer Concatenation")
    return store, store


async def reading_store(harness: Harness) -> tuple[Store, ObjectReader]:
    """A new store and, the same object, its ``ObjectReader`` (else a skip)."""
    store = await harness.open()
    if not isinstance(store, ObjectReader):
        pytest.skip(f"{type(store).__name__} does not offer ObjectReader")
    return store, store


class ConcatTests(KitTests):
    async def test_join_assembles_in_the_store(self, harness: Harness) -> None:
        store, joiner = await joining_store(harness)
        pieces = [payload(5 * MIB + 1, seed=31), payload(6 * MIB, seed=32), payload(123, seed=33)]
        sources = [await finished(store, f"parts/{i}", p) for i, p in enumerate(pieces)]
        assert joiner.can_join(sources)
        whole = b"".join(pieces)
        info = await empty_session(store, "a" * 24, len(whole), "joined.bin")
        done = await joiner.join(info, sources)
        assert done.completed is not None
        assert done.completed.size == done.offset == len(whole)
        assert done.completed.crc32c == done.crc32c == crc(whole)
        assert done.object_name == "joined.bin" and done.owner == "u1"
        assert done.content_type == "video/mp4" and dict(done.metadata) == {"k": "v"}
        assert harness.read_object("joined.bin") == whole
        # Durable: a new store instance sees the completed session.
        again = await (await harness.open()).get(info.name)
        assert durable_fields(again) == durable_fields(done)
        # The sources stay as they were; the session name never became an object.
        assert harness.read_object("parts/1") == pieces[1]
        assert harness.read_object(info.name) is None

    async def test_a_join_it_accepts_comes_out_right_whatever_the_sizes(
        self, harness: Harness
    ) -> None:
        store, joiner = await joining_store(harness)
        pieces = [payload(1000, seed=34), payload(MIB, seed=35), b"z"]
        sources = [await finished(store, f"small/{i}", p) for i, p in enumerate(pieces)]
        if not joiner.can_join(sources):
            pytest.skip(f"{type(store).__name__} joins no sources this small (it streams them)")
        info = await empty_session(store, "e" * 24, sum(map(len, pieces)), "small.bin")
        done = await joiner.join(info, sources)
        assert done.completed is not None and done.completed.crc32c == crc(b"".join(pieces))
        assert harness.read_object("small.bin") == b"".join(pieces)

    async def test_join_refuses_a_changed_or_missing_source(self, harness: Harness) -> None:
        store, joiner = await joining_store(harness)
        old = await finished(store, "changing.bin", payload(5 * MIB, seed=36))
        tail = await finished(store, "tail.bin", b"tail")
        # Replaced by another upload of the same name (and another size).
        await finished(store, "changing.bin", payload(5 * MIB + 10, seed=37))
        info = await empty_session(store, "b" * 24, old.size + 4, "out.bin")
        with pytest.raises(OffsetMismatch):
            await joiner.join(info, [old, tail])
        gone = CompletedObject(key=tail.key.replace("tail.bin", "never.bin"), bucket=tail.bucket,
                               size=4, etag=tail.etag, crc32c=tail.crc32c, completed_at=0.0)
        info = await empty_session(store, "c" * 24, 8, "out2.bin")
        with pytest.raises(UploadNotFound):
            await joiner.join(info, [gone, tail])
        # A refused join leaves the session empty and unfinished, no object made.
        state = await store.get(info.name)
        assert (state.offset, state.completed) == (0, None)
        assert harness.read_object("out2.bin") is None

    async def test_join_refuses_a_session_that_moved(self, harness: Harness) -> None:
        store, joiner = await joining_store(harness)
        source = await finished(store, "src.bin", payload(1000, seed=38))
        info = await empty_session(store, "d" * 24, 1000, "dst.bin")
        await append(store, info, b"x")
        with pytest.raises(OffsetMismatch):
            await joiner.join(info, [source])
        assert harness.read_object("dst.bin") is None

    async def test_read_object_gives_the_finished_bytes(self, harness: Harness) -> None:
        store, reader = await reading_store(harness)
        pieces = [payload(1000, seed=39), payload(3 * MIB + 7, seed=40), b"z", b""]
        sources = [await finished(store, f"read/{i}", p) for i, p in enumerate(pieces)]
        for source, piece in zip(sources, pieces, strict=True):
            assert await read_all(reader, source) == piece
        restarted = await harness.open()
        assert isinstance(restarted, ObjectReader)
        assert await read_all(restarted, sources[1]) == pieces[1]

    async def test_read_object_refuses_a_changed_or_missing_object(
        self, harness: Harness
    ) -> None:
        store, reader = await reading_store(harness)
        old = await finished(store, "reread.bin", payload(2000, seed=41))
        await finished(store, "reread.bin", payload(3000, seed=42))
        with pytest.raises(OffsetMismatch):
            await read_all(reader, old)
        current = await finished(store, "kept.bin", b"kept")
        gone = CompletedObject(key=current.key.replace("kept.bin", "never.bin"),
                               bucket=current.bucket, size=4, etag=current.etag,
                               crc32c=current.crc32c, completed_at=0.0)
        with pytest.raises(UploadNotFound):
            await read_all(reader, gone)
