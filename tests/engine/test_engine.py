"""The upload engine on the memory store: no socket, no moto, no disk.

Bodies are fakes of the engine's ``Body`` protocol; a body that should stall
waits on an ``asyncio.Event``, so races are made by events, never by sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import google_crc32c
import pytest

from app.config import StorageConfig
from app.core import rules
from app.core.grant import Grant
from app.core.protocol import Chunk
from app.engine.bodies import BodyInterrupted
from app.engine.engine import UploadEngine
from app.engine.model import ClientDigests, Outcome
from app.engine.writers import WriterRegistry
from app.errors import (
    DigestMismatch,
    Forbidden,
    LengthMismatch,
    OffsetMismatch,
    TooLarge,
    UploadNotFound,
)
from app.stores.base import UploadInfo
from app.stores.memory import MemoryBacking, MemoryStore

TTL = 3600.0
DATA = bytes(range(256)) * 12  # 3072 bytes
ANYONE = Grant()


class FakeBody:
    """A request body that hands out ``chunks``, then ends, or with ``stall``
    waits until it is aborted (a client that went quiet mid-body)."""

    def __init__(self, *chunks: bytes, stall: bool = False) -> None:
        self._chunks = list(chunks)
        self._stall = stall
        self._aborted = asyncio.Event()
        #: Set when every chunk was handed out and the body started to stall.
        self.drained = asyncio.Event()
        self.reads = 0

    async def read(self) -> bytes:
        self.reads += 1
        if self._aborted.is_set():
            raise BodyInterrupted("aborted")
        if self._chunks:
            return self._chunks.pop(0)
        if not self._stall:
            return b""
        self.drained.set()
        await self._aborted.wait()
        raise BodyInterrupted("taken over")

    def abort(self) -> None:
        self._aborted.set()


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    engine: UploadEngine
    store: MemoryStore
    backing: MemoryBacking
    clock: Clock
    writers: WriterRegistry
    completed: list[UploadInfo] = field(default_factory=list)

    async def chunk(
        self,
        start: int,
        end: int,
        total: int | None,
        body: FakeBody | None = None,
        *,
        grant: Grant = ANYONE,
        digests: ClientDigests | None = None,
        mode: rules.Mode = rules.Mode.SKIP_OVERLAP,
        name: str = "a.bin",
    ) -> Outcome:
        """``Content-Range: bytes start-end/total`` with DATA's bytes of that range."""
        if body is None:
            body = FakeBody(DATA[start : end + 1])
        return await self.engine.put_chunk(
            name, Chunk(start, end, total), body, content_length=end - start + 1,
            content_type=None, grant=grant, digests=digests, mode=mode,
        )


def make_rig(store_type: type[MemoryStore] = MemoryStore, **storage: object) -> Rig:
    config = StorageConfig(backend="memory", upload_ttl=TTL, **storage)  # type: ignore[arg-type]
    clock = Clock()
    backing = MemoryBacking()
    store = store_type(backing, config, clock=clock)
    writers = WriterRegistry(takeover_timeout=5)
    completed: list[UploadInfo] = []

    async def on_complete(info: UploadInfo) -> None:
        completed.append(info)

    engine = UploadEngine(store, config, writers, on_complete=on_complete, clock=clock)
    return Rig(engine, store, backing, clock, writers, completed)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


def crc32c_of(data: bytes) -> bytes:
    return google_crc32c.value(data).to_bytes(4, "big")


# -- offsets ----------------------------------------------------------------------


async def test_resent_bytes_are_skipped(rig: Rig) -> None:
    first = await rig.chunk(0, 999, len(DATA))
    assert (first.info.offset, first.stored, first.complete) == (1000, 1000, False)
    again = await rig.chunk(500, 1999, len(DATA))  # half of it already stored
    assert (again.info.offset, again.stored) == (2000, 1000)
    duplicate = await rig.chunk(0, 999, len(DATA))  # a client retrying the same chunk
    assert (duplicate.info.offset, duplicate.stored) == (2000, 0)
    last = await rig.chunk(2000, len(DATA) - 1, len(DATA))
    assert last.complete
    assert rig.backing.objects["a.bin"] == DATA


async def test_a_gap_is_refused_and_stores_nothing(rig: Rig) -> None:
    await rig.chunk(0, 999, len(DATA))
    with pytest.raises(OffsetMismatch) as caught:
        await rig.chunk(1500, 1999, len(DATA))
    assert caught.value.offset == 1000
    assert (await rig.store.get("a.bin")).offset == 1000


@pytest.mark.parametrize("start", [500, 1500])
async def test_exact_offset_mode_refuses_any_other_start(rig: Rig, start: int) -> None:
    await rig.chunk(0, 999, len(DATA))
    body = FakeBody(DATA[start:2000])
    with pytest.raises(OffsetMismatch) as caught:
        await rig.chunk(start, 1999, len(DATA), body, mode=rules.Mode.EXACT_OFFSET)
    assert caught.value.offset == 1000
    assert body.reads == 0  # refused before a byte of the body was read
    stored = await rig.store.get("a.bin")
    assert (stored.offset, stored.crc32c) == (1000, google_crc32c.value(DATA[:1000]))
    ok = await rig.chunk(1000, 1999, len(DATA), mode=rules.Mode.EXACT_OFFSET)
    assert ok.info.offset == 2000


async def test_a_body_longer_than_its_range_keeps_only_the_range(rig: Rig) -> None:
    body = FakeBody(DATA[:1000], b"extra")
    with pytest.raises(LengthMismatch):
        await rig.chunk(0, 999, len(DATA), body)
    assert (await rig.store.get("a.bin")).offset == 1000


# -- totals -----------------------------------------------------------------------


async def test_an_unknown_total_is_settled_by_the_last_chunk(rig: Rig) -> None:
    first = await rig.chunk(0, 999, None)
    assert (first.info.total, first.complete) == (None, False)
    last = await rig.chunk(1000, len(DATA) - 1, len(DATA))
    assert last.complete
    assert last.info.total == last.info.offset == len(DATA)
    assert rig.backing.objects["a.bin"] == DATA


async def test_a_probe_with_the_total_finishes_an_open_ended_upload(rig: Rig) -> None:
    await rig.chunk(0, len(DATA) - 1, None)
    assert not (await rig.engine.status("a.bin", None, ANYONE)).complete
    done = await rig.engine.status("a.bin", len(DATA), ANYONE)
    assert done.complete and done.info.total == len(DATA)
    assert rig.backing.objects["a.bin"] == DATA


async def test_a_plain_put_of_unknown_length_settles_at_the_end(rig: Rig) -> None:
    body = FakeBody(DATA[:1000], DATA[1000:])
    outcome = await rig.engine.put_whole(
        "a.bin", body, content_length=None, content_type="text/plain", grant=ANYONE
    )
    assert outcome.complete and outcome.info.total == len(DATA)
    assert outcome.info.content_type == "text/plain"
    assert rig.backing.objects["a.bin"] == DATA


# -- limits -----------------------------------------------------------------------


async def test_a_total_beyond_the_grant_is_refused_before_anything_is_created(rig: Rig) -> None:
    with pytest.raises(TooLarge):
        await rig.chunk(0, 999, len(DATA), grant=Grant(max_size=len(DATA) - 1))
    with pytest.raises(UploadNotFound):
        await rig.store.get("a.bin")


async def test_an_open_range_beyond_the_configured_size_is_refused() -> None:
    rig = make_rig(max_upload_size=1500)
    with pytest.raises(TooLarge):
        await rig.chunk(0, 1999, None)
    with pytest.raises(UploadNotFound):
        await rig.store.get("a.bin")
    await rig.chunk(0, 999, None)
    with pytest.raises(TooLarge):
        await rig.chunk(1000, 1999, None)  # the range ends past the limit
    assert (await rig.store.get("a.bin")).offset == 1000


async def test_a_stream_past_the_configured_size_keeps_what_fits() -> None:
    rig = make_rig(max_upload_size=1500)
    body = FakeBody(DATA[:1000], DATA[1000:2000])
    with pytest.raises(TooLarge):
        await rig.engine.put_whole(
            "a.bin", body, content_length=None, content_type=None, grant=ANYONE
        )
    stored = await rig.store.get("a.bin")
    assert (stored.offset, stored.completed) == (1500, None)
    assert rig.completed == []


# -- completion ---------------------------------------------------------------------


async def test_completion_runs_the_hook_once(rig: Rig) -> None:
    done = await rig.chunk(0, len(DATA) - 1, len(DATA))
    assert done.complete and done.info.completed is not None
    assert done.info.completed.size == len(DATA)
    assert done.info.completed.crc32c == google_crc32c.value(DATA)
    assert [info.session_id for info in rig.completed] == [done.info.session_id]
    assert rig.completed[0].is_complete
    # A client retrying its last chunk gets the same answer, and nobody is told twice.
    again = await rig.chunk(0, len(DATA) - 1, len(DATA))
    assert again.info.completed == done.info.completed
    assert len(rig.completed) == 1


async def test_a_single_request_upload_records_its_md5() -> None:
    rig = make_rig(md5=True)
    done = await rig.engine.put_whole(
        "a.bin", FakeBody(DATA), content_length=len(DATA), content_type=None, grant=ANYONE
    )
    assert done.info.completed is not None
    assert done.info.completed.md5 == hashlib.md5(DATA).digest()


# -- digests ------------------------------------------------------------------------


async def test_a_matching_crc32c_completes(rig: Rig) -> None:
    done = await rig.chunk(
        0, len(DATA) - 1, len(DATA), digests=ClientDigests(crc32c=crc32c_of(DATA))
    )
    assert done.complete


async def test_a_crc32c_mismatch_discards_the_upload(rig: Rig) -> None:
    await rig.chunk(0, 999, len(DATA))
    wrong = ClientDigests(crc32c=crc32c_of(DATA[:-1] + b"?"))
    with pytest.raises(DigestMismatch):
        await rig.chunk(1000, len(DATA) - 1, len(DATA), digests=wrong)
    with pytest.raises(UploadNotFound):
        await rig.store.get("a.bin")
    assert "a.bin" not in rig.backing.objects
    assert rig.completed == []


async def test_an_md5_mismatch_discards_the_upload(rig: Rig) -> None:
    wrong = ClientDigests(md5=hashlib.md5(b"something else").digest())
    with pytest.raises(DigestMismatch):
        await rig.engine.put_whole(
            "a.bin", FakeBody(DATA), content_length=len(DATA), content_type=None,
            grant=ANYONE, digests=wrong,
        )
    with pytest.raises(UploadNotFound):
        await rig.store.get("a.bin")


class ReplacedWhileDiscarding(MemoryStore):
    """Another process starts a new upload of the name just before a cancel."""

    async def cancel(self, name: str, *, session_id: str | None = None) -> None:
        other = MemoryStore(self.backing)
        await other.create(name, total=None, content_type="x/y", metadata={}, owner=None)
        await super().cancel(name, session_id=session_id)


async def test_a_digest_mismatch_discards_only_its_own_session() -> None:
    rig = make_rig(ReplacedWhileDiscarding)
    wrong = ClientDigests(crc32c=crc32c_of(b"not the data"))
    with pytest.raises(DigestMismatch):
        await rig.chunk(0, len(DATA) - 1, len(DATA), digests=wrong)
    replacement = await rig.store.get("a.bin")
    assert (replacement.content_type, replacement.offset) == ("x/y", 0)


# -- writers, owners, expiry ----------------------------------------------------------


async def test_a_new_request_takes_over_a_stalled_one(rig: Rig) -> None:
    stalled = FakeBody(DATA[:1000], stall=True)
    first = asyncio.create_task(rig.chunk(0, len(DATA) - 1, len(DATA), stalled))
    await asyncio.wait_for(stalled.drained.wait(), 5)

    # The client reconnected and resends everything from byte 0.
    second = await rig.chunk(0, len(DATA) - 1, len(DATA))
    assert second.complete
    assert second.stored == len(DATA) - 1000  # the first writer's bytes were kept and skipped

    taken_over = await asyncio.wait_for(first, 5)
    assert taken_over.interrupted
    assert (taken_over.info.offset, taken_over.stored) == (1000, 1000)
    assert rig.writers.takeovers == 1
    assert rig.backing.objects["a.bin"] == DATA


async def test_another_owner_is_forbidden(rig: Rig) -> None:
    alice, bob = Grant(owner="alice"), Grant(owner="bob")
    await rig.chunk(0, 999, len(DATA), grant=alice)
    with pytest.raises(Forbidden):
        await rig.chunk(1000, 1999, len(DATA), grant=bob)
    with pytest.raises(Forbidden):
        await rig.engine.status("a.bin", None, bob)
    with pytest.raises(Forbidden):
        await rig.engine.cancel("a.bin", bob)
    with pytest.raises(Forbidden):
        await rig.engine.put_whole(
            "a.bin", FakeBody(b"mine now"), content_length=8, content_type=None, grant=bob
        )
    stored = await rig.store.get("a.bin")
    assert (stored.owner, stored.offset) == ("alice", 1000)
    assert (await rig.chunk(1000, 1999, len(DATA), grant=alice)).info.offset == 2000


async def test_an_idle_upload_expires(rig: Rig) -> None:
    first = await rig.chunk(0, 999, len(DATA))
    rig.clock.now += TTL - 1
    assert (await rig.engine.status("a.bin", None, ANYONE)).info.offset == 1000
    rig.clock.now += 2  # now idle for longer than the TTL
    with pytest.raises(UploadNotFound):
        await rig.chunk(1000, 1999, len(DATA))
    with pytest.raises(UploadNotFound):
        await rig.engine.status("a.bin", None, ANYONE)
    # Starting again from byte 0 is a new upload.
    fresh = await rig.chunk(0, 999, len(DATA))
    assert fresh.info.session_id != first.info.session_id
    assert fresh.info.offset == 1000


async def test_a_completed_upload_does_not_expire(rig: Rig) -> None:
    done = await rig.chunk(0, len(DATA) - 1, len(DATA))
    rig.clock.now += 10 * TTL
    assert (await rig.engine.status("a.bin", None, ANYONE)).info.completed == done.info.completed


# -- the layout hint ------------------------------------------------------------------


class HintedStore(MemoryStore):
    """Records the ``expected_length`` of every write."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hints: list[int | None] = []

    async def write(self, info, chunks, *, total=None, expected_length=None):  # type: ignore[override]
        self.hints.append(expected_length)
        return await super().write(info, chunks, total=total, expected_length=expected_length)


async def test_the_store_is_told_how_many_new_bytes_a_request_declares() -> None:
    rig = make_rig(HintedStore)
    await rig.chunk(0, 999, None)
    await rig.chunk(500, 1999, None)  # 500 bytes resent: 1,000 new ones declared
    await rig.engine.put_stream("a.bin", 2000, FakeBody(DATA[2000:]), total=None, grant=ANYONE)
    await rig.engine.put_whole("b.bin", FakeBody(DATA), content_length=len(DATA),
                               content_type=None, grant=ANYONE)
    assert isinstance(rig.store, HintedStore)
    assert rig.store.hints == [1000, 1000, None, None, len(DATA)]
