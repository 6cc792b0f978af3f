"""Optional capabilities: a store that lacks one has its tests skipped with the reason."""

from __future__ import annotations

import pytest

from app.stores.base import CallbackOutbox, HealthCheck, ObjectLookup, ObjectOwners, PendingNotices
from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.helpers import append, new_upload


class CapabilityTests(KitTests):
    async def test_health_check(self, harness: Harness) -> None:
        store = await harness.open()
        if not isinstance(store, HealthCheck):
            pytest.skip(f"{type(store).__name__} does not offer HealthCheck")
        assert await store.check_health() is None

    async def test_callback_outbox(self, harness: Harness) -> None:
        store = await harness.open()
        if not isinstance(store, CallbackOutbox):
            pytest.skip(f"{type(store).__name__} does not offer CallbackOutbox")
        binary = bytes(range(256))
        assert await store.list_pending() == []
        await store.save_pending("cb-1", b'{"name": "a"}')
        await store.save_pending("cb/2 odd id", binary)
        await store.save_pending("cb-1", b'{"name": "a", "retry": 1}')
        again = await harness.open()
        assert isinstance(again, CallbackOutbox)
        assert sorted(await again.list_pending()) == sorted(
            [("cb-1", b'{"name": "a", "retry": 1}'), ("cb/2 odd id", binary)]
        )
        await again.delete_pending("cb-1")
        await again.delete_pending("cb-1")
        await again.delete_pending("never-saved")
        assert await store.list_pending() == [("cb/2 odd id", binary)]

    async def test_pending_notice_is_recorded_with_the_completion_and_cleared(
        self, harness: Harness
    ) -> None:
        store = await harness.open()
        if not isinstance(store, PendingNotices):
            pytest.skip(f"{type(store).__name__} does not offer PendingNotices")
        info = await append(store, await new_upload(store, "owed.bin", total=5), b"hello")
        done = await store.finish(info, notify=True)
        assert done.notify_pending and done.is_complete
        quiet = await store.finish(
            await append(store, await new_upload(store, "quiet.bin", total=2), b"hi")
        )
        assert not quiet.notify_pending
        # Durable: another instance sees it, and a repeat finish keeps it.
        again = await harness.open()
        assert isinstance(again, PendingNotices)
        assert (await again.get("owed.bin")).notify_pending
        assert (await again.finish(done, notify=False)).notify_pending
        owed = [i.name async for i in again.list_completed() if i.notify_pending]
        assert owed == ["owed.bin"]
        # Another session's id, or a name without a record, changes nothing.
        await again.clear_notice("owed.bin", "not-the-session")
        await again.clear_notice("never.bin", done.session_id)
        assert (await store.get("owed.bin")).notify_pending
        await again.clear_notice("owed.bin", done.session_id)
        await again.clear_notice("owed.bin", done.session_id)
        cleared = await store.get("owed.bin")
        assert not cleared.notify_pending
        assert cleared.completed == done.completed

    async def test_object_owner_outlives_the_session_record(self, harness: Harness) -> None:
        store = await harness.open()
        if not isinstance(store, ObjectOwners):
            pytest.skip(f"{type(store).__name__} does not offer ObjectOwners")
        assert await store.owner_of("owned/a.bin") is None
        info = await new_upload(store, "owned/a.bin", total=3, owner="Ünïcode owner 42")
        info = await append(store, info, b"abc")
        # Unfinished: there is no object yet, so no owner of one.
        assert await store.owner_of("owned/a.bin") is None
        await store.finish(info)
        await store.cancel("owned/a.bin")  # the record goes, the object stays
        again = await harness.open()
        assert isinstance(again, ObjectOwners)
        assert await again.owner_of("owned/a.bin") == "Ünïcode owner 42"
        # A replacement in progress leaves the finished object's owner alone...
        other = await append(
            again, await new_upload(again, "owned/a.bin", total=2, owner="u2"), b"xy")
        assert await again.owner_of("owned/a.bin") == "Ünïcode owner 42"
        # ...until it finishes; then the object is the new owner's.
        await again.finish(other)
        assert await store.owner_of("owned/a.bin") == "u2"
        anonymous = await append(
            store, await new_upload(store, "owned/a.bin", total=1, owner=None), b"z")
        await store.finish(anonymous)
        assert await store.owner_of("owned/a.bin") is None
        # Metadata cannot forge an owner.
        forged = await new_upload(store, "owned/b.bin", total=1, owner=None,
                                  metadata={"upload-owner": "u1"})
        await store.finish(await append(store, forged, b"q"))
        assert await store.owner_of("owned/b.bin") is None

    async def test_object_lookup_sees_finished_objects_only(self, harness: Harness) -> None:
        store = await harness.open()
        if not isinstance(store, ObjectLookup):
            pytest.skip(f"{type(store).__name__} does not offer ObjectLookup")
        assert not await store.object_exists("look/a.bin")
        info = await append(store, await new_upload(store, "look/a.bin", total=2), b"ab")
        assert not await store.object_exists("look/a.bin")  # unfinished: no object yet
        await store.finish(info)
        assert await store.object_exists("look/a.bin")
        await store.cancel("look/a.bin")  # the record goes, the object stays
        assert await (await harness.open()).object_exists("look/a.bin")
        assert not await store.object_exists("look")  # a folder is no object
