"""Write leases between two S3Store instances on one bucket (each one an
'instance'): asking the writer to let go, and fencing off a writer whose
lease ran out. The multi-process versions are in tests/test_scaling.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from app.errors import OffsetMismatch, WriterBusy
from app.stores.s3.store import S3Store
from tests.stores.test_s3_store import (
    MIB,
    P,
    create,
    open_s3,  # noqa: F401 - the fixture
    payload,
    read_object,
    stream,
)


class Parts:
    """A ``CallObserver`` counting the UploadParts a store got answered."""

    def __init__(self) -> None:
        self.uploaded = 0

    def __call__(self, operation: str, seconds: float, error: str | None) -> None:
        if operation == "UploadPart" and error is None:
            self.uploaded += 1

    async def reached(self, count: int) -> bool:
        return self.uploaded >= count


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll real state until ``check()`` is true (a deadline, not a race)."""
    try:
        async with asyncio.timeout(30):
            while not await check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def held_by(store: S3Store, name: str, holder: S3Store) -> bool:
    loaded = await store.records.read(name)
    return loaded is not None and loaded[0].lease is not None \
        and loaded[0].lease.holder == holder.leases.instance


async def held_body(first: bytes, until: asyncio.Event, then: bytes = b"") -> AsyncIterator[bytes]:
    """A client that sends ``first``, then waits for ``until`` (its request
    being stopped, or the test letting it go on), then sends ``then``."""
    yield first
    await until.wait()
    if then:
        yield then


def writing_request(store: S3Store, info: Any, body: AsyncIterator[bytes],
                    stop: Callable[[], None]) -> asyncio.Task[Any]:
    """A request of ``store``'s instance writing ``body``, as the engine runs one."""
    async def request() -> Any:
        async with store.writing(info.name, stop):
            return await store.write(info, body)
    return asyncio.create_task(request())


async def test_a_writer_asked_by_another_instance_saves_what_arrived_and_lets_go(
        open_s3, s3_client, bucket) -> None:  # noqa: F811
    a, b = await open_s3(lease_ttl=2), await open_s3(lease_ttl=2)
    data = payload(3 * P, seed=31)
    info = await create(a, "asked.bin", len(data))
    asked = asyncio.Event()

    # Part 1 fills (A takes the lease to upload it); A's client goes on
    # sending, slowly, until the stop ends its body.
    a_task = writing_request(a, info, held_body(data[: P + MIB], asked), asked.set)
    await until(lambda: held_by(b, "asked.bin", a), "A holds the lease")
    async with b.writing("asked.bin", lambda: None):
        # B got in because A let go: A was asked, and saved all it had.
        assert asked.is_set()
        current = await b.get("asked.bin")
        assert current.offset == P + MIB
        loaded = await b.records.read("asked.bin")
        assert loaded is not None and loaded[0].lease is None  # released, not expired
        done = await b.finish(await b.write(current, stream(data[current.offset :])))
    a_done = await a_task
    assert a_done.offset == P + MIB
    assert done.completed is not None
    assert read_object(s3_client, bucket, "asked.bin") == data


async def test_a_writer_whose_lease_ran_out_is_fenced_off(open_s3, s3_client, bucket) -> None:  # noqa: F811
    a, b = await open_s3(lease_ttl=2), await open_s3(lease_ttl=2)
    a_parts = Parts()
    a.observe_calls(a_parts)
    data = payload(3 * P, seed=32)
    info = await create(a, "fenced.bin", len(data))
    resume = asyncio.Event()

    # A stops after part 1, as a frozen process would: it neither answers
    # the request to let go nor renews (no data flows); then part 2's bytes.
    body = held_body(data[: P + MIB], resume, then=data[P + MIB : 2 * P + MIB])
    a_task = writing_request(a, info, body, lambda: None)
    await until(lambda: held_by(b, "fenced.bin", a), "A holds the lease")
    await until(lambda: a_parts.reached(1), "part 1 uploaded")
    async with b.writing("fenced.bin", lambda: None):  # waits for A's lease to expire
        current = await b.get("fenced.bin")
        assert current.offset == P  # part 1, recorded by A under its lease
        done = await b.finish(await b.write(current, stream(data[P:])))
    assert done.completed is not None

    resume.set()
    with pytest.raises(OffsetMismatch):
        await a_task
    assert a_parts.uploaded == 1  # nothing uploaded after B took over
    assert read_object(s3_client, bucket, "fenced.bin") == data


async def test_a_writer_that_does_not_let_go_in_time_is_refused_as_busy(open_s3) -> None:  # noqa: F811
    a = await open_s3(lease_ttl=30)
    b = await open_s3(lease_ttl=30, takeover_timeout=0.5)
    data = payload(2 * P, seed=33)
    info = await create(a, "busy.bin", len(data))
    release = asyncio.Event()

    # A holder that never answers.
    a_task = writing_request(a, info, held_body(data[: P + MIB], release), lambda: None)
    await until(lambda: held_by(b, "busy.bin", a), "A holds the lease")
    with pytest.raises(WriterBusy) as caught:
        async with b.writing("busy.bin", lambda: None):
            pass
    assert 1 <= caught.value.retry_after <= 30
    release.set()
    assert (await a_task).offset == P + MIB


async def test_a_stalled_request_short_of_a_part_is_asked_too(
        open_s3, s3_client, bucket) -> None:  # noqa: F811
    """A request that has not filled a part needs no lease to stage its
    bytes; one that is still running a moment later takes it anyway, so that
    another instance can ask it to save what arrived instead of racing it."""
    a, b = await open_s3(lease_ttl=2), await open_s3(lease_ttl=2)
    data = payload(2 * MIB, seed=34)
    info = await create(a, "stalled.bin", len(data))
    asked = asyncio.Event()

    a_task = writing_request(a, info, held_body(data[:MIB], asked), asked.set)
    await until(lambda: held_by(b, "stalled.bin", a), "A takes the lease of its slow write")
    async with b.writing("stalled.bin", lambda: None):
        assert asked.is_set()
        current = await b.get("stalled.bin")
        assert current.offset == MIB  # A's bytes were staged before it let go
        await b.finish(await b.write(current, stream(data[MIB:])))
    assert (await a_task).offset == MIB
    assert read_object(s3_client, bucket, "stalled.bin") == data
