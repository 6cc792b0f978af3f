"""Optional capabilities: a store that lacks one has its tests skipped with the reason."""

from __future__ import annotations

import pytest

from app.stores.base import CallbackOutbox, HealthCheck
from tests.stores.kit.harness import Harness, KitTests


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
