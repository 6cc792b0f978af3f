"""Listing unfinished and completed uploads (what the cleanup job walks)."""

from __future__ import annotations

import pytest

from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.helpers import (
    append,
    new_upload,
)


class ListingTests(KitTests):
    async def test_list_unfinished_lists_only_unfinished_uploads(
        self, harness: Harness
    ) -> None:
        store = await harness.open()
        written = await append(store, await new_upload(store, "l/written.bin"), b"x" * 100)
        await new_upload(store, "l/cancelled.bin")
        await store.cancel("l/cancelled.bin")
        await store.finish(await new_upload(store, "l/finished.bin", total=0))
        idle = await new_upload(store, "l/idle.bin", total=10)

        for instance in (store, await harness.open()):
            found = {info.name: info async for info in instance.list_unfinished()}
            assert set(found) == {"l/written.bin", "l/idle.bin"}
            assert found["l/written.bin"].offset == 100
            assert found["l/written.bin"].session_id == written.session_id
            assert found["l/written.bin"].updated_at >= written.created_at > 0
            assert found["l/idle.bin"].updated_at == pytest.approx(idle.updated_at)
            assert all(info.completed is None for info in found.values())

    async def test_list_completed_lists_only_completed_uploads(self, harness: Harness) -> None:
        store = await harness.open()
        await append(store, await new_upload(store, "c/unfinished.bin"), b"x" * 10)
        done = await store.finish(
            await append(store, await new_upload(store, "c/done.bin", total=4), b"done")
        )
        for instance in (store, await harness.open()):
            found = {info.name: info async for info in instance.list_completed()}
            assert set(found) == {"c/done.bin"}
            assert found["c/done.bin"].completed == done.completed
        # Forgetting the record keeps the object.
        await store.cancel("c/done.bin", session_id=done.session_id)
        assert [info async for info in store.list_completed()] == []
        assert harness.read_object("c/done.bin") == b"done"
