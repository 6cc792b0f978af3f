"""What each backend's ``can_join`` answers (the rest of the joining
capabilities is checked for every store by the kit, tests/stores/kit/concat.py):
the filesystem joins sources of any size, S3 only those it can copy as
parts (every one but the last at least 5 MiB); the tus dialect streams the
others through ``ObjectReader``."""

from __future__ import annotations

import os

from app.core.model import CompletedObject
from app.stores.base import Concatenation, ObjectReader
from tests.stores.fixtures import StoreHarness
from tests.stores.kit.concat import finished, read_all

MIB = 1024 * 1024


def fake(size: int) -> CompletedObject:
    return CompletedObject(key="k", bucket="b", size=size, etag='"e"', crc32c=0,
                           completed_at=0.0)


async def test_small_parts_are_for_the_reader_on_s3(store_harness: StoreHarness) -> None:
    store = await store_harness.open()
    assert isinstance(store, Concatenation) and isinstance(store, ObjectReader)
    pieces = [os.urandom(1000), os.urandom(MIB), b"z"]
    sources = [await finished(store, f"small/{i}", p) for i, p in enumerate(pieces)]
    assert store.can_join(sources) is (store_harness.kind == "filesystem")
    read = b"".join([await read_all(store, s) for s in sources])
    assert read == b"".join(pieces)


async def test_s3_part_rules(store_harness: StoreHarness) -> None:
    store = await store_harness.open()
    assert isinstance(store, Concatenation)
    on_s3 = store_harness.kind == "s3"
    assert store.can_join([fake(5 * MIB), fake(1)])
    assert store.can_join([fake(5 * MIB - 1), fake(5 * MIB)]) is not on_s3
    # S3 cannot complete a multipart upload with an empty last part.
    assert store.can_join([fake(5 * MIB), fake(0)]) is not on_s3
    assert store.can_join([fake(5 * MIB)] * 10_001) is not on_s3
