"""A new store instance over the same backing storage: a restart or a second process."""

from __future__ import annotations

from itertools import pairwise

import pytest

from app.errors import OffsetMismatch
from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.helpers import (
    MIB,
    append,
    crc,
    durable_fields,
    new_upload,
    payload,
)


class RestartTests(KitTests):
    async def test_state_survives_a_restart(self, harness: Harness) -> None:
        store = await harness.open()
        data = payload(70_000, seed=13)
        info = await new_upload(store, "restart.bin", metadata={"k": "v"}, owner="o")
        info = await append(store, info, data[:33_333])
        await store.close()

        second = await harness.open()
        assert durable_fields(await second.get("restart.bin")) == durable_fields(info)
        info = await append(second, await second.get("restart.bin"), data[33_333:], total=70_000)
        done = await second.finish(info)

        third = await harness.open()
        assert durable_fields(await third.get("restart.bin")) == durable_fields(done)
        assert harness.read_object("restart.bin") == data

    async def test_a_stale_instance_gets_offset_mismatch(self, harness: Harness) -> None:
        """Another process that got there first is seen through the backing storage."""
        first = await harness.open()
        second = await harness.open()
        data = payload(20_000, seed=6)
        info = await append(first, await new_upload(first, "race.bin"), data[:5_000])
        theirs = await second.get("race.bin")
        await append(second, theirs, data[5_000:12_000])
        with pytest.raises(OffsetMismatch) as caught:
            await append(first, info, b"Z" * 100)
        assert caught.value.offset == 12_000
        info = await first.get("race.bin")
        assert info.offset == 12_000
        info = await append(first, info, data[12_000:], total=len(data))
        await first.finish(info)
        assert harness.read_object("race.bin") == data

    async def test_appends_across_part_boundaries_and_a_restart(self, harness: Harness) -> None:
        part = 5 * MIB
        data = payload(13 * MIB + 7, seed=2)
        cuts = [0, 1 * MIB, part + 1, 2 * part, len(data)]
        first = await harness.open_with(part_size=part)
        info = await new_upload(first, "parts/video.bin", total=len(data))
        assert info.part_size == part
        for start, end in pairwise(cuts[:3]):
            info = await append(first, info, data[start:end], chunk_size=300_001)
            assert info.offset == end
            assert info.crc32c == crc(data[:end])
        # A second process picks up the upload after a part boundary was crossed.
        second = await harness.open_with(part_size=part)
        info = await second.get("parts/video.bin")
        assert info.offset == cuts[2]
        assert info.part_size == part
        for start, end in pairwise(cuts[2:]):
            info = await append(second, info, data[start:end], chunk_size=1 * MIB + 3)
            assert info.offset == end
        assert info.crc32c == crc(data)
        done = await second.finish(info)
        assert done.completed is not None
        assert done.completed.size == len(data)
        assert done.completed.crc32c == crc(data)
        assert harness.read_object("parts/video.bin") == data
