"""Store fixtures shared by the conformance suite and the HTTP tests.

``store_harness`` is parametrized over every store. Each param gets fresh
backing storage (a temp directory, or a new bucket on the moto server);
``harness.open()`` gives a new store instance over that same storage, which is
how tests simulate a restart or a second process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.config import Config, StorageConfig, config_from_mapping
from app.config import replace as replace_config
from app.stores import open_store
from app.stores.base import Store

STORE_KINDS = ["filesystem", "s3"]


@dataclass
class StoreHarness:
    kind: str
    config: Config
    _opened: list[Store] = field(default_factory=list)

    @property
    def storage(self) -> StorageConfig:
        return self.config.storage

    async def open(self) -> Store:
        store = await open_store(self.config.storage)
        self._opened.append(store)
        return store

    async def open_with(self, **storage_overrides: object) -> Store:
        """A new store instance over the same backing storage with some storage
        keys changed, e.g. ``open_with(part_size=5 * 1024 * 1024)``."""
        config = replace_config(self.config, storage=storage_overrides)
        store = await open_store(config.storage)
        self._opened.append(store)
        return store

    async def close_all(self) -> None:
        for store in self._opened:
            await store.close()
        self._opened.clear()


def storage_config(kind: str, tmp_path: Path, moto_endpoint: str | None, bucket: str | None,
                   **storage: object) -> Config:
    raw: dict[str, object] = {"backend": kind, **storage}
    if kind == "filesystem":
        raw["filesystem"] = {"root": str(tmp_path / "data"), "fsync": True}
    else:
        raw["s3"] = {
            "bucket": bucket,
            "endpoint_url": moto_endpoint,
            "prefix": "uploads/",
            "addressing_style": "path",
        }
    return config_from_mapping({"storage": raw})


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def store_harness(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[StoreHarness]:
    endpoint = bucket = None
    if store_kind == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = request.getfixturevalue("bucket")
    harness = StoreHarness(store_kind, storage_config(store_kind, tmp_path, endpoint, bucket))
    yield harness
    await harness.close_all()
