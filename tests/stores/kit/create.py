"""Creating an upload and reading its state."""

from __future__ import annotations

import pytest

from app.core.protocol import choose_part_size
from app.errors import TooLarge, UploadNotFound
from app.stores.base import UploadInfo
from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.helpers import (
    GIB,
    append,
    chunked,
    durable_fields,
    new_upload,
)


class CreateTests(KitTests):
    async def test_create_then_get(self, harness: Harness) -> None:
        store = await harness.open()
        created = await new_upload(store, "a/b.bin", total=1234, content_type="video/mp4")
        assert created.name == "a/b.bin"
        assert created.offset == 0
        assert created.total == 1234
        assert created.crc32c == 0
        assert created.part_size == harness.storage.part_size
        assert created.content_type == "video/mp4"
        assert created.completed is None and not created.is_complete
        assert created.session_id
        assert 0 < created.created_at <= created.updated_at
        got = await store.get("a/b.bin")
        assert durable_fields(got) == durable_fields(created)

    async def test_metadata_content_type_owner_round_trip(self, harness: Harness) -> None:
        store = await harness.open()
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
        for seen in (info, await store.get("meta.bin"), await (await harness.open()).get(
            "meta.bin"
        )):
            assert dict(seen.metadata) == metadata
            assert seen.content_type == 'video/mp4; codecs="avc1.42E01E"'
            assert seen.owner == "user-42"
        done = await store.finish(info)
        assert dict(done.metadata) == metadata
        assert done.owner == "user-42"
        assert harness.read_object("meta.bin") == b"hello"

        anonymous = await new_upload(store, "anon.bin")
        assert anonymous.owner is None
        assert dict((await store.get("anon.bin")).metadata) == {}

    async def test_part_size_grows_only_for_huge_totals(self, harness: Harness) -> None:
        store = await harness.open()
        default = harness.storage.part_size
        unknown = await new_upload(store, "unknown.bin")
        assert unknown.part_size == default
        huge_total = 100 * GIB
        huge = await new_upload(store, "huge.bin", total=huge_total)
        assert huge.part_size == choose_part_size(huge_total, default)
        assert huge.part_size * 10_000 >= huge_total

    async def test_total_beyond_any_object_is_too_large(self, harness: Harness) -> None:
        store = await harness.open()
        # Past 10,000 parts of the largest part, so no store can take it.
        with pytest.raises(TooLarge):
            await new_upload(store, "too-big.bin", total=100 * 1024 * 1024 * GIB)
        with pytest.raises(UploadNotFound):
            await store.get("too-big.bin")

    async def test_unknown_upload_is_not_found(self, harness: Harness) -> None:
        store = await harness.open()
        ghost = UploadInfo(
            name="never/created.bin",
            session_id="0" * 32,
            offset=0,
            total=None,
            part_size=harness.storage.part_size,
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
