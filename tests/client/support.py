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


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP__")}
    env["PYTHONPATH"] = ROOT
    return env


async def run_python(code: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """A real second process (the event loop keeps serving while it runs)."""
    import asyncio
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, cwd=ROOT, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
