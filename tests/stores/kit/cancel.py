"""Replacing and cancelling uploads."""

from __future__ import annotations

import pytest

from app.errors import OffsetMismatch, UploadNotFound
from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.helpers import (
    append,
    new_upload,
)


class CancelTests(KitTests):
    async def test_create_replaces_an_unfinished_upload(self, harness: Harness) -> None:
        store = await harness.open()
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
        assert harness.read_object("again.bin") == b"new"

    async def test_a_replaced_object_stays_until_the_new_upload_finishes(
        self, harness: Harness
    ) -> None:
        store = await harness.open()
        await store.finish(await append(store, await new_upload(store, "v.txt", total=2), b"v1"))
        info = await append(store, await new_upload(store, "v.txt", total=4), b"v2")
        assert (await store.get("v.txt")).completed is None
        assert harness.read_object("v.txt") == b"v1"
        await store.finish(await append(store, info, b"v2"))
        assert harness.read_object("v.txt") == b"v2v2"

    async def test_cancel_discards_the_upload(self, harness: Harness) -> None:
        store = await harness.open()
        info = await append(store, await new_upload(store, "gone.bin", total=10), b"12345")
        await store.cancel("gone.bin")
        with pytest.raises(UploadNotFound):
            await store.get("gone.bin")
        with pytest.raises(UploadNotFound):
            await (await harness.open()).get("gone.bin")
        with pytest.raises(UploadNotFound):
            await append(store, info, b"67890")
        with pytest.raises(UploadNotFound):
            await store.cancel("gone.bin")
        assert harness.read_object("gone.bin") is None
        fresh = await new_upload(store, "gone.bin")
        assert (fresh.offset, fresh.crc32c) == (0, 0)

    async def test_cancel_of_a_finished_upload_keeps_the_object(self, harness: Harness) -> None:
        store = await harness.open()
        info = await append(store, await new_upload(store, "keep.bin", total=4), b"keep")
        await store.finish(info)
        await store.cancel("keep.bin")
        with pytest.raises(UploadNotFound):
            await store.get("keep.bin")
        assert harness.read_object("keep.bin") == b"keep"

    async def test_cancel_of_a_replaced_session_changes_nothing(self, harness: Harness) -> None:
        store = await harness.open()
        old = await new_upload(store, "swap.bin")
        new = await append(store, await new_upload(store, "swap.bin"), b"new bytes")
        with pytest.raises(UploadNotFound):
            await store.cancel("swap.bin", session_id=old.session_id)
        current = await store.get("swap.bin")
        assert (current.session_id, current.offset) == (new.session_id, len(b"new bytes"))
        await store.cancel("swap.bin", session_id=new.session_id)
        with pytest.raises(UploadNotFound):
            await store.get("swap.bin")
