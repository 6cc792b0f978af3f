"""What the kit cannot see of the memory store: how it is opened and what it says."""

from __future__ import annotations

import logging

import pytest

from app.config import config_from_mapping
from app.stores.memory import MemoryBacking, MemoryStore
from app.stores.registry import open_store
from tests.stores.kit.helpers import append, new_upload


async def test_open_store_warns_that_nothing_survives_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="app.stores.memory")
    store = await open_store(config_from_mapping({"storage": {"backend": "memory"}}).storage)
    assert isinstance(store, MemoryStore)
    assert any(
        r.levelno == logging.WARNING and "nothing survives a restart" in r.getMessage()
        for r in caplog.records
    )


async def test_objects_name_a_neutral_bucket_and_instances_share_the_backing() -> None:
    backing = MemoryBacking()
    store = MemoryStore(backing)
    done = await store.finish(await append(store, await new_upload(store, "a", total=2), b"ab"))
    assert done.completed is not None and done.completed.bucket == "memory"
    assert (await MemoryStore(backing).get("a")).completed == done.completed
    assert backing.objects == {"a": b"ab"}
    assert (await MemoryStore().list_pending()) == []  # a fresh backing is empty
