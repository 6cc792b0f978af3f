"""Finishing an upload into its object."""

from __future__ import annotations

import hashlib

import pytest

from app.core.protocol import id_session_name
from app.errors import BadRequest, UploadNotFound
from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.helpers import (
    append,
    chunked,
    crc,
    new_upload,
    no_chunks,
    payload,
)


class FinishTests(KitTests):
    async def test_finish_is_idempotent(self, harness: Harness) -> None:
        store = await harness.open()
        data = payload(10_000, seed=11)
        info = await append(store, await new_upload(store, "twice.bin", total=len(data)), data)
        first = await store.finish(info)
        assert first.is_complete and first.completed is not None
        assert first.completed.size == len(data)
        assert first.completed.etag
        again = await store.finish(info)
        assert again.completed == first.completed
        assert (await store.finish(first)).completed == first.completed
        assert (await store.get("twice.bin")).completed == first.completed
        restarted = await harness.open()
        assert (await restarted.finish(info)).completed == first.completed
        assert harness.read_object("twice.bin") == data

    async def test_finish_records_the_given_md5(self, harness: Harness) -> None:
        store = await harness.open()
        data = b"digest me"
        info = await append(store, await new_upload(store, "md5.bin", total=len(data)), data)
        digest = hashlib.md5(data).digest()
        done = await store.finish(info, md5=digest)
        assert done.completed is not None and done.completed.md5 == digest
        assert (await store.get("md5.bin")).completed == done.completed

    async def test_finish_before_all_bytes_is_refused(self, harness: Harness) -> None:
        store = await harness.open()
        data = payload(1_000, seed=12)
        info = await append(store, await new_upload(store, "early.bin", total=1_000), data[:600])
        with pytest.raises(BadRequest):
            await store.finish(info)
        state = await store.get("early.bin")
        assert (state.offset, state.crc32c, state.completed) == (600, crc(data[:600]), None)
        assert harness.read_object("early.bin") is None

        open_ended = await append(store, await new_upload(store, "open.bin"), data)
        with pytest.raises(BadRequest):
            await store.finish(open_ended)
        assert (await store.get("open.bin")).completed is None

        state = await append(store, state, data[600:])
        await store.finish(state)
        assert harness.read_object("early.bin") == data

    @pytest.mark.parametrize("settle_late", [False, True])
    async def test_zero_length_upload(self, harness: Harness, settle_late: bool) -> None:
        store = await harness.open()
        info = await new_upload(store, "empty.bin", total=None if settle_late else 0)
        if settle_late:
            info = await store.write(info, no_chunks(), total=0)
        assert (info.offset, info.total) == (0, 0)
        done = await store.finish(info)
        assert done.completed is not None
        assert (done.completed.size, done.completed.crc32c) == (0, 0)
        assert harness.read_object("empty.bin") == b""

    async def test_write_after_finish_is_not_found(self, harness: Harness) -> None:
        store = await harness.open()
        info = await new_upload(store, "closed.bin", total=0)
        await store.finish(info)
        with pytest.raises(UploadNotFound):
            await store.write(info, chunked(b"more"))

    async def test_nested_and_unicode_names(self, harness: Harness) -> None:
        store = await harness.open()
        name = "dir/sub dir/ünïcødé 📦 (1).bin"
        info = await append(store, await new_upload(store, name, total=4), b"\x00\x01\x02\x03")
        done = await store.finish(info)
        assert done.completed is not None and done.completed.key.endswith(name)
        assert harness.read_object(name) == b"\x00\x01\x02\x03"

    async def test_id_sessions_aimed_at_one_object_the_last_to_finish_wins(
        self, harness: Harness
    ) -> None:
        store = await harness.open()
        first_name = id_session_name("kit", "a" * 24)
        second_name = id_session_name("kit", "b" * 24)
        first_data, second_data = payload(7_000, seed=21), payload(5_000, seed=22)
        first = await store.create(first_name, total=len(first_data), content_type="x/y",
                                   metadata={}, owner=None, target="shared/obj.bin")
        second = await store.create(second_name, total=len(second_data), content_type="x/y",
                                    metadata={}, owner=None, target="shared/obj.bin")
        assert (first.object_name, second.object_name) == ("shared/obj.bin",) * 2
        # Interleaved: neither session sees the other's bytes.
        first = await append(store, first, first_data[:3_000])
        second = await append(store, second, second_data)
        first = await append(store, first, first_data[3_000:])
        done = await store.finish(second)
        assert done.completed is not None and done.completed.key.endswith("shared/obj.bin")
        assert harness.read_object("shared/obj.bin") == second_data
        done = await store.finish(first)
        assert done.completed is not None and done.completed.crc32c == crc(first_data)
        assert harness.read_object("shared/obj.bin") == first_data
        assert (await (await harness.open()).get(first_name)).target == "shared/obj.bin"
        # The session names never became objects.
        assert harness.read_object(first_name) is None
