"""Store fixtures shared by the store kit and the HTTP tests.

``store_harness`` is parametrized over the stores the HTTP tests run against
(``STORE_KINDS``); ``kit_harness`` over every store the kit checks
(``KIT_KINDS``, which adds the memory store: its state lives in one process, so
it cannot back several proxies the way the HTTP tests start them). Each param
gets fresh backing storage (a temp directory, a new bucket on the moto server,
a new ``MemoryBacking``); ``harness.open()`` gives a new store instance over
that same storage, which is how tests simulate a restart or a second process.
Every harness here implements ``tests.stores.kit.Harness``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.config import Config, StorageConfig, config_from_mapping
from app.config import replace as replace_config
from app.stores.base import Store
from app.stores.memory import MemoryBacking, MemoryStore
from app.stores.registry import open_store

STORE_KINDS = ["filesystem", "s3"]
KIT_KINDS = [*STORE_KINDS, "memory"]


@dataclass
class StoreHarness:
    """Stores opened from a full ``Config`` with ``open_store``, as the app does."""

    kind: str
    config: Config
    known_differences: Mapping[str, str] = field(default_factory=dict)
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

    def read_object(self, name: str) -> bytes | None:
        raise NotImplementedError(f"no object reader for {self.kind}")

    async def close_all(self) -> None:
        for store in self._opened:
            await store.close()
        self._opened.clear()


@dataclass
class FilesystemHarness(StoreHarness):
    def read_object(self, name: str) -> bytes | None:
        path = Path(self.storage.filesystem.root) / name
        return path.read_bytes() if path.is_file() else None


@dataclass
class S3Harness(StoreHarness):
    #: A boto3 client on the moto server: the object is read without aiobotocore.
    client: Any = None

    def read_object(self, name: str) -> bytes | None:
        s3 = self.storage.s3
        try:
            response = self.client.get_object(Bucket=s3.bucket, Key=s3.prefix + name)
        except self.client.exceptions.NoSuchKey:
            return None
        return response["Body"].read()


@dataclass
class MemoryHarness:
    """Memory stores over one ``MemoryBacking``: a new instance is a restart."""

    storage: StorageConfig = field(
        default_factory=lambda: config_from_mapping({"storage": {"backend": "memory"}}).storage
    )
    backing: MemoryBacking = field(default_factory=MemoryBacking)
    known_differences: Mapping[str, str] = field(default_factory=dict)

    async def open(self) -> Store:
        return MemoryStore(self.backing, self.storage)

    async def open_with(self, **storage_overrides: object) -> Store:
        config = config_from_mapping({"storage": {"backend": "memory"}})
        storage = replace_config(config, storage=storage_overrides).storage
        return MemoryStore(self.backing, storage)

    def read_object(self, name: str) -> bytes | None:
        return self.backing.objects.get(name)

    async def close_all(self) -> None:
        return None


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


def make_harness(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> StoreHarness | MemoryHarness:
    """Fresh backing storage of ``kind`` for one test."""
    if kind == "memory":
        return MemoryHarness()
    if kind == "filesystem":
        return FilesystemHarness(kind, storage_config(kind, tmp_path, None, None))
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("bucket")
    return S3Harness(
        kind,
        storage_config(kind, tmp_path, endpoint, bucket),
        client=request.getfixturevalue("s3_client"),
    )


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def store_harness(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[StoreHarness]:
    harness = make_harness(store_kind, tmp_path, request)
    assert isinstance(harness, StoreHarness), "the HTTP tests need a config-based store"
    yield harness
    await harness.close_all()


@pytest.fixture(params=KIT_KINDS)
async def kit_harness(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreHarness | MemoryHarness]:
    harness = make_harness(request.param, tmp_path, request)
    yield harness
    await harness.close_all()
