"""Parts that match the client's chunks: the first write settles the S3 part
size from its declared length, so aligned chunks become one part each with
nothing staged, while chunks that do not align still make the same object.

S3 calls are counted with the store's ``CallObserver`` (``ReportsCalls``),
and what touched the bucket is read from an ``S3Gate`` in front of moto.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator

import google_crc32c
import pytest

from app.core.protocol import MIB
from app.stores.s3.parts import PartBody
from app.stores.s3.store import S3Store
from app.stores.s3.writer import SMALL_PIECE
from tests.s3_gate import S3Gate, Seen
from tests.stores import test_s3_store
from tests.stores.test_s3_store import (
    P,
    create,
    keys,
    list_parts,
    payload,
    read_object,
    staged_prefix,
    stream,
)

CHUNK = 8 * MIB
#: Store instances over the test bucket, as in the other S3 store tests.
open_s3 = test_s3_store.open_s3


class Calls:
    """A ``CallObserver`` counting the store's S3 calls by operation."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.errors: list[tuple[str, str]] = []

    def __call__(self, operation: str, seconds: float, error: str | None) -> None:
        self.counts[operation] += 1
        if error is not None:
            self.errors.append((operation, error))

    def take(self) -> Counter[str]:
        """The counts since the last ``take``."""
        counts, self.counts = self.counts, Counter()
        return counts


async def observed(open_s3, gate: S3Gate, tag: str, **storage: object) -> tuple[S3Store, Calls]:
    store = await open_s3(endpoint=await gate.listener(tag), **storage)
    calls = Calls()
    store.observe_calls(calls)
    return store, calls


def staged_requests(gate: S3Gate) -> list[Seen]:
    return [s for s in gate.seen() if "/.uploads/staged/" in s.path]


def part_number(number: int) -> object:
    return lambda seen: seen.is_upload_part() and seen.query.get("partNumber") == str(number)


async def write_chunks(store: S3Store, info, data: bytes, start: int, size: int, *,
                       calls: Calls | None = None, per_chunk: list[Counter[str]] | None = None):
    """Write ``data[start:]`` as requests of ``size`` bytes, each declaring
    its length as the engine does for a ``Content-Range`` chunk."""
    for at in range(start, len(data), size):
        piece = data[at : at + size]
        info = await store.write(info, stream(piece, chunk=64 * 1024),
                                 expected_length=len(piece))
        assert info.offset == at + len(piece)
        if calls is not None and per_chunk is not None:
            per_chunk.append(calls.take())
    return info


def part_etags(s3_client, bucket: str, name: str) -> list[str]:
    upload = s3_client.list_multipart_uploads(Bucket=bucket, Prefix="uploads/" + name)["Uploads"]
    parts = s3_client.list_parts(Bucket=bucket, Key="uploads/" + name,
                                 UploadId=upload[0]["UploadId"])["Parts"]
    return [p["ETag"].strip('"') for p in parts]


# -- aligned chunks ---------------------------------------------------------------


@pytest.mark.parametrize("leases", [True, False], ids=["leases", "single-instance"])
@pytest.mark.parametrize("total_known", [True, False], ids=["total", "no-total"])
async def test_aligned_chunks_are_one_part_each_and_stage_nothing(
    open_s3, s3_client, bucket, gate, total_known, leases
):
    store, calls = await observed(open_s3, gate, "aligned",
                                  s3={"conditional_writes": leases})
    data = payload(3 * CHUNK + 3 * MIB, seed=21)
    info = await create(store, "aligned.bin", len(data) if total_known else None)
    assert info.part_size == P
    calls.take()
    per_chunk: list[Counter[str]] = []
    info = await write_chunks(store, info, data[: 3 * CHUNK], 0, CHUNK, calls=calls,
                              per_chunk=per_chunk)
    assert info.part_size == CHUNK
    for counts in per_chunk:
        # One UploadPart and the record write that names it (which releases
        # the lease), plus the lease's take before the part; nothing staged,
        # read back or deleted, and the record this process wrote is trusted.
        assert counts["UploadPart"] == 1, counts
        assert counts["PutObject"] == (2 if leases else 1), counts
        assert counts["GetObject"] == 0, counts
        assert counts["DeleteObjects"] == 0, counts
    assert staged_requests(gate) == []
    assert list_parts(s3_client, bucket, "aligned.bin") == [(1, CHUNK), (2, CHUNK), (3, CHUNK)]

    # The last, shorter chunk is the last part.
    info = await store.write(info, stream(data[3 * CHUNK :]), total=len(data),
                             expected_length=3 * MIB)
    done = await store.finish(info)
    assert staged_requests(gate) == []
    assert keys(s3_client, bucket, staged_prefix(info.session_id)) == []
    assert read_object(s3_client, bucket, "aligned.bin") == data
    assert done.completed is not None and done.completed.crc32c == google_crc32c.value(data)


async def test_the_configured_part_size_stages_unaligned_chunks(open_s3, s3_client, bucket, gate):
    """What settling saves: the same 8 MiB chunks with the part size fixed
    at 5 MiB (no length declared) stage a tail on every request."""
    store, _ = await observed(open_s3, gate, "fixed")
    data = payload(2 * CHUNK, seed=22)
    info = await create(store, "fixed.bin", None)
    for at in range(0, len(data), CHUNK):
        info = await store.write(info, stream(data[at : at + CHUNK]))
    assert info.part_size == P
    assert staged_requests(gate) != []


async def test_a_plain_put_keeps_the_configured_part_size(open_s3, s3_client, bucket):
    store = await open_s3()
    data = payload(2 * CHUNK, seed=23)
    info = await create(store, "plain.bin", len(data))
    # The whole object in one request: nothing to align with.
    info = await store.write(info, stream(data), expected_length=len(data))
    assert info.part_size == P
    assert list_parts(s3_client, bucket, "plain.bin") == [(1, P), (2, P), (3, P), (4, MIB)]
    await store.finish(info)
    assert read_object(s3_client, bucket, "plain.bin") == data


async def test_a_chunk_over_the_cap_settles_a_whole_divisor(open_s3, s3_client, bucket, gate):
    store, _ = await observed(open_s3, gate, "capped", max_part_size=CHUNK)
    data = payload(4 * CHUNK, seed=24)
    info = await create(store, "capped.bin", None)
    info = await write_chunks(store, info, data, 0, 2 * CHUNK)
    assert info.part_size == CHUNK
    assert [size for _, size in list_parts(s3_client, bucket, "capped.bin")] == [CHUNK] * 4
    assert staged_requests(gate) == []
    await store.finish(await store.write(info, stream(b""), total=len(data)))
    assert read_object(s3_client, bucket, "capped.bin") == data


# -- chunks that do not align --------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "then"),
    [(MIB, MIB), (CHUNK, 7 * MIB), (7 * MIB, CHUNK), (CHUNK, MIB)],
    ids=["1MiB", "8MiB-then-7MiB", "7MiB-then-8MiB", "8MiB-then-1MiB"],
)
async def test_unaligned_chunks_make_the_same_object(open_s3, s3_client, bucket, first, then):
    store = await open_s3()
    data = payload(4 * CHUNK + 12345, seed=25)
    info = await create(store, "unaligned.bin", len(data))
    info = await store.write(info, stream(data[:first]), expected_length=first)
    settled = info.part_size
    assert settled == (first if first >= 5 * MIB else P)
    info = await write_chunks(store, info, data, first, then)
    # Equal parts stay equal: the later chunks never change the part size.
    assert info.part_size == settled
    sizes = [size for _, size in list_parts(s3_client, bucket, "unaligned.bin")]
    assert sizes[:-1] == [settled] * (len(sizes) - 1)
    done = await store.finish(info)
    assert read_object(s3_client, bucket, "unaligned.bin") == data
    assert done.completed is not None and done.completed.crc32c == google_crc32c.value(data)


async def test_a_cut_first_chunk_keeps_its_part_size_and_a_mid_part_resume_works(
    open_s3, s3_client, bucket
):
    store = await open_s3()
    data = payload(3 * CHUNK + 5 * MIB, seed=26)
    info = await create(store, "cut.bin", len(data))

    async def cut_body() -> AsyncIterator[bytes]:
        yield data[: 3 * MIB]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.write(info, cut_body(), expected_length=CHUNK)
    info = await (await open_s3()).get("cut.bin")
    assert (info.offset, info.part_size) == (3 * MIB, CHUNK)
    assert keys(s3_client, bucket, staged_prefix(info.session_id)) != []
    # The client resends in 8 MiB chunks from the stored offset: mid-part.
    info = await write_chunks(store, info, data, 3 * MIB, CHUNK)
    assert info.part_size == CHUNK
    assert [s for _, s in list_parts(s3_client, bucket, "cut.bin")][:3] == [CHUNK] * 3
    done = await store.finish(info)
    assert read_object(s3_client, bucket, "cut.bin") == data
    assert done.completed is not None and done.completed.crc32c == google_crc32c.value(data)


async def test_a_first_chunk_that_stores_nothing_settles_nothing(open_s3, bucket):
    store = await open_s3()
    info = await create(store, "empty-first.bin", None)
    before = info.version
    info = await store.write(info, stream(b""), expected_length=CHUNK)
    assert (info.offset, info.part_size, info.version) == (0, P, before)
    again = await (await open_s3()).get("empty-first.bin")
    assert again.part_size == P
    # The next first chunk decides afresh.
    info = await store.write(info, stream(payload(7 * MIB)), expected_length=7 * MIB)
    assert info.part_size == 7 * MIB


# -- retries and restarts ------------------------------------------------------------


async def test_a_part_that_fails_once_and_lands_late_keeps_order_and_digests(
    open_s3, s3_client, bucket, gate
):
    """Part 2 is refused once (botocore sends it again from the same buffer),
    and its second attempt is held until part 3 has landed: the record still
    names the parts in order, each with its own bytes' CRC32C and MD5."""
    store, calls = await observed(open_s3, gate, "retry")
    data = payload(4 * CHUNK, seed=27)
    info = await create(store, "retry.bin", len(data))
    info = await store.write(info, stream(data[:CHUNK]), expected_length=CHUNK)
    assert info.part_size == CHUNK

    gate.answer(part_number(2), 503, "SlowDown", "injected", count=1)
    late = gate.hold(part_number(2))
    third = gate.hold(part_number(3))
    third.release()  # never held: only its ``forwarded`` is awaited

    async def release_after_part_3() -> None:
        await third.forwarded.wait()
        late.release()

    calls.take()
    releaser = asyncio.create_task(release_after_part_3())
    info = await store.write(info, stream(data[CHUNK:], chunk=1_000_003),
                             expected_length=3 * CHUNK)
    await releaser
    # botocore's retry is inside the one call the observer sees.
    assert late.taken == 1 and calls.counts["UploadPart"] == 3
    attempts = [s for s in gate.seen("retry") if part_number(2)(s)]
    assert len(attempts) == 2

    record, _ = await store.records.load("retry.bin")
    assert record.parts is not None and len(record.parts) == 4
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    assert [p.crc32c for p in record.parts] == [google_crc32c.value(p) for p in pieces]
    assert [p.end_crc32c for p in record.parts] == [
        google_crc32c.value(data[: (n + 1) * CHUNK]) for n in range(4)]
    assert part_etags(s3_client, bucket, "retry.bin") == [
        hashlib.md5(p).hexdigest() for p in pieces]
    done = await store.finish(info)
    assert read_object(s3_client, bucket, "retry.bin") == data
    assert done.completed is not None and done.completed.crc32c == google_crc32c.value(data)


async def test_a_new_instance_continues_with_the_settled_part_size(
    open_s3, s3_client, bucket, gate
):
    first = await open_s3()
    data = payload(3 * CHUNK + MIB, seed=28)
    info = await create(first, "restart.bin", None)
    info = await write_chunks(first, info, data[:CHUNK], 0, CHUNK)
    await first.close()

    second, calls = await observed(open_s3, gate, "second")
    info = await second.get("restart.bin")
    assert (info.offset, info.part_size) == (CHUNK, CHUNK)
    calls.take()
    per_chunk: list[Counter[str]] = []
    info = await write_chunks(second, info, data[: 3 * CHUNK], CHUNK, CHUNK, calls=calls,
                              per_chunk=per_chunk)
    assert [c["UploadPart"] for c in per_chunk] == [1, 1]
    info = await second.write(info, stream(data[3 * CHUNK :]), total=len(data),
                              expected_length=MIB)
    await second.finish(info)
    assert staged_requests(gate) == []
    assert read_object(s3_client, bucket, "restart.bin") == data


# -- the part body ------------------------------------------------------------------


async def test_a_part_goes_to_the_http_client_as_the_pieces_that_arrived(open_s3, bucket):
    """Neither botocore (a ``BytesIO`` that aiohttp copies) nor aiohttp (the
    head joined with the whole body) gets a part to copy, and the store does
    not join one: it goes out as ``memoryview`` slices of the very pieces
    the body was read in."""
    store = await open_s3()
    bodies: list[tuple[type, tuple[object, ...]]] = []

    def seen(params: dict, **_: object) -> None:
        body = params["body"]
        bodies.append((type(body), tuple(getattr(body, "pieces", ()))))

    store.client.events.register("before-call.s3.UploadPart", seen)
    data = payload(CHUNK, seed=29)
    arrived = [data[i : i + 300_000] for i in range(0, len(data), 300_000)]

    async def body() -> AsyncIterator[bytes]:
        for piece in arrived:
            yield piece

    info = await create(store, "body.bin", None)
    await store.write(info, body(), expected_length=CHUNK)
    assert [kind for kind, _ in bodies] == [PartBody]
    sent = bodies[0][1]
    assert [id(p) for p in sent] == [id(p) for p in arrived]
    slices = [s async for s in PartBody(sent)]  # type: ignore[arg-type]
    assert {type(s) for s in slices} == {memoryview}
    assert {id(s.obj) for s in slices} == {id(p) for p in arrived}
    assert b"".join(slices) == data


async def test_part_bodies_survive_payload_signing(open_s3, s3_client, bucket):
    """Payload signing reads the body to hash it and seeks back before it is sent."""
    store = await open_s3(s3={"payload_signing": True})
    data = payload(2 * CHUNK + MIB, seed=30)
    info = await create(store, "signed.bin", len(data))
    info = await write_chunks(store, info, data, 0, CHUNK)
    await store.finish(info)
    assert read_object(s3_client, bucket, "signed.bin") == data


async def test_a_part_body_reads_and_seeks_like_a_file() -> None:
    body = PartBody([b"0123", b"", bytearray(b"456789")])
    assert (len(body), body.read(4), body.tell()) == (10, b"0123", 4)
    assert body.read() == b"456789" and body.read(3) == b""
    assert body.seek(-3, 2) == 7 and body.read(None) == b"789"
    # Sent from where a rewind left it, as often as asked.
    body.seek(5)
    assert b"".join([bytes(s) async for s in body]) == b"56789"
    assert body.seek(0) == 0
    assert b"".join([bytes(s) async for s in body]) == b"0123456789"
    assert b"".join([bytes(s) async for s in body]) == b"0123456789"


async def test_tiny_reads_are_gathered_not_kept_one_by_one(open_s3, s3_client, bucket):
    """A body read a few bytes at a time still makes the part, and the part
    goes out as a few buffers, not an object per read."""
    store = await open_s3()
    bodies: list[int] = []

    def seen(params: dict, **_: object) -> None:
        bodies.append(len(params["body"].pieces))

    store.client.events.register("before-call.s3.UploadPart", seen)
    data = payload(P + 1000, seed=31)
    info = await create(store, "tiny.bin", len(data))
    info = await store.write(info, stream(data, chunk=997))
    # Part 1 took 5,259 reads; without gathering it would be as many pieces.
    # Part 2 is the last 1,000 bytes.
    assert bodies[0] <= P // SMALL_PIECE + 1 and bodies[1:] == [1]
    await store.finish(info)
    assert read_object(s3_client, bucket, "tiny.bin") == data
