"""What the GCS dialect's tests share: a proxy serving Google's JSON API
buckets over a store harness, and reading back what was stored."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.http_support import Proxy, ProxyFactory
from tests.stores.fixtures import StoreHarness
from tests.test_http import stored_object

#: The bucket the clients name, and where its objects go in the store.
BUCKET = "media"
PREFIX = "media/"
MIB = 1024 * 1024


@pytest.fixture
async def gcs_proxies(store_harness: StoreHarness) -> AsyncIterator[ProxyFactory]:
    factory = ProxyFactory(store_harness.config)
    yield factory
    await factory.stop_all()


async def start_gcs(factory: ProxyFactory, **sections: object) -> Proxy:
    gcs = {"buckets": {BUCKET: PREFIX}, **dict(sections.pop("gcs", {}))}  # type: ignore[arg-type]
    return await factory.start(gcs=gcs, **sections)  # type: ignore[arg-type]


async def stored(harness: StoreHarness, name: str) -> bytes:
    """The object ``name`` of the bucket, as the store holds it."""
    return await stored_object(harness, PREFIX + name)
