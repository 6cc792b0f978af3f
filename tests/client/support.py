"""Shared helpers for the client tests: the real server on every store, and
whatever sits between it and the client (fault relay, stub proxy)."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator

import pytest

from tests.http_support import Proxy, ProxyFactory
from tests.stores.fixtures import StoreHarness

MIB = 1024 * 1024
KIB = 1024
PART = 5 * MIB


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
async def proxies(store_harness: StoreHarness) -> AsyncIterator[ProxyFactory]:
    factory = ProxyFactory(store_harness.config)
    yield factory
    await factory.stop_all()


@pytest.fixture
async def proxy(proxies: ProxyFactory) -> Proxy:
    return await proxies.start(storage={"part_size": PART})


async def stored(harness: StoreHarness, name: str) -> bytes:
    storage = harness.storage
    if harness.kind == "filesystem":
        with open(os.path.join(storage.filesystem.root, name), "rb") as fh:
            return fh.read()
    import boto3

    client = boto3.client("s3", endpoint_url=storage.s3.endpoint_url, region_name="us-east-1")
    return client.get_object(Bucket=storage.s3.bucket, Key=storage.s3.prefix + name)["Body"].read()
