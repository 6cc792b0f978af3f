"""The memory budget end to end, on S3 (a real moto server over HTTP): a
request that finds it used up stops reading its client, goes on when memory
frees, and after ``storage.budget_wait`` answers 503 with what it had read
kept; many uploads at once through a budget of a few parts all land intact."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from app.config import Config
from app.core.budget import MemoryBudget
from app.errors import Overloaded
from app.http import keys
from app.http.dialects.gcs import GcsDialect
from app.http.dialects.ietf import IetfDialect
from app.http.dialects.ours import OurDialect
from app.http.dialects.tus import TusDialect
from tests import test_tus as tus
from tests.http_support import ProxyFactory, unread_by_server, unsent_bytes
from tests.stores.fixtures import storage_config
from tests.test_http import crc_b64, probe, put_range
from tests.test_ops_http import scrape, value

MIB = 1024 * 1024
PART = 5 * MIB
#: What a request waiting for memory may have read off its socket: aiohttp's
#: buffer (twice 16 KiB), one socket read past it (256 KiB) and the chunk in
#: hand (as much again), 576 KiB, with room to spare. (With aiohttp's own
#: 256 KiB buffer it read 1.05 MiB.)
READ_BOUND = 768 * 1024
#: Bytes that must sit unread in the kernel before the bound is checked: the
#: client got well past what the server read.
QUEUED = 1 * MIB


@pytest.fixture
async def proxies(tmp_path: Path, moto_endpoint: str, bucket: str
                  ) -> AsyncIterator[ProxyFactory]:
    # One part and the smallest checksum buffer: a single stalled upload
    # holds the whole budget.
    config = storage_config("s3", tmp_path, moto_endpoint, bucket, part_size=PART,
                            memory_budget=PART + MIB, checksum_buffer=MIB, parts_in_flight=1)
    factory = ProxyFactory(config)
    yield factory
    await factory.stop_all()


def stored(s3_client, bucket: str, name: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=f"uploads/{name}")["Body"].read()


async def until(condition, what: str, timeout: float = 30) -> None:
    """Poll ``condition`` (a state, never a duration) until it holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


class Holder:
    """An upload that sends its first bytes and then nothing until ``go``: its
    part buffer stays held meanwhile."""

    def __init__(self, http: aiohttp.ClientSession, url: str, data: bytes) -> None:
        self.go = asyncio.Event()
        self.data = data

        async def body() -> AsyncIterator[bytes]:
            yield data[:64 * 1024]
            await self.go.wait()
            yield data[64 * 1024:]

        async def send() -> int:
            async with http.put(url, data=body(),
                                headers={"Content-Length": str(len(data))}) as resp:
                await resp.read()
                return resp.status

        self.task = asyncio.create_task(send())


class RawUpload:
    """A PUT sent from a thread over a plain socket, counting what it sent, so
    the test can tell what the server read off the socket."""

    def __init__(self, port: int, name: str, data: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.data = data
        self.sent = 0
        self.answer = b""
        head = (f"PUT /upload/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                f"Content-Range: bytes 0-{len(data) - 1}/{len(data)}\r\n"
                "Connection: close\r\n\r\n")
        self.sock.sendall(head.encode())
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        view = memoryview(self.data)
        try:
            while self.sent < len(self.data):
                self.sent += self.sock.send(view[self.sent:self.sent + 64 * 1024])
            while chunk := self.sock.recv(65536):
                self.answer += chunk
        except OSError:
            pass
        finally:
            self.done.set()

    def queued(self) -> int:
        """Sent bytes the server process has not read (both kernels' queues)."""
        return unsent_bytes(self.sock) + unread_by_server(self.sock)

    def read_by_server(self) -> int:
        return self.sent - self.queued()

    def close(self) -> None:
        self.sock.close()


async def test_a_request_without_memory_stops_reading_and_goes_on_once_it_frees(
        proxies, http, s3_client, bucket) -> None:
    proxy = await proxies.start()
    budget: MemoryBudget = proxy.app[keys.BUDGET]
    holder = Holder(http, f"{proxy.url}/upload/holder.bin", os.urandom(PART + 3 * MIB))
    await until(lambda: budget.held >= PART, "the holder took its part buffer")
    waiting = RawUpload(proxy.port, "waiting.bin", os.urandom(3 * PART + 123))
    try:
        await until(lambda: budget.waiting == 1, "the second upload waits for memory")
        # TCP holds the client back: bytes pile up in the kernel, not the server.
        await until(lambda: waiting.queued() >= QUEUED, "the client is held back")
        assert budget.waiting == 1
        assert waiting.read_by_server() <= READ_BOUND
        assert budget.held <= budget.limit
        async with http.get(f"{proxy.url}/metrics") as resp:
            samples = scrape(await resp.text())
        assert value(samples, "memory_budget_bytes") == PART + MIB
        assert value(samples, "memory_waiting_requests") == 1
        assert value(samples, "memory_held_bytes") == budget.held
        assert value(samples, "memory_held_peak_bytes") >= PART
        assert value(samples, "memory_waits_timed_out_total") == 0
        # Memory frees (the holder's part fills and goes to S3): the waiting
        # upload gets it and both finish.
        holder.go.set()
        assert await holder.task == 200
        await asyncio.get_running_loop().run_in_executor(None, waiting.done.wait, 60)
        assert waiting.answer.startswith(b"HTTP/1.1 200"), waiting.answer[:300]
    finally:
        waiting.close()
    assert stored(s3_client, bucket, "holder.bin") == holder.data
    assert stored(s3_client, bucket, "waiting.bin") == waiting.data
    assert (budget.held, budget.waiting, budget.timeouts) == (0, 0, 0)
    assert budget.peak <= budget.limit


async def test_a_request_that_waited_too_long_gets_503_and_keeps_what_it_read(
        proxies, http, s3_client, bucket) -> None:
    # The wait is what is tested: a short one.
    proxy = await proxies.start(storage={"budget_wait": 0.5})
    budget: MemoryBudget = proxy.app[keys.BUDGET]
    url = f"{proxy.url}/upload/late.bin"
    data = os.urandom(2 * PART + 77)
    first = PART + 100 * 1024 + 7
    # A first part and some bytes staged past it: the request that waits asks
    # for the buffer of a part whose start is staged already.
    resp = await put_range(http, url, data[:first], 0, len(data))
    assert resp.status == 308
    holder = Holder(http, f"{proxy.url}/upload/holder.bin", os.urandom(2 * MIB))
    await until(lambda: budget.held >= 2 * MIB, "the holder took its buffer")
    async with http.put(url, data=data[first:], allow_redirects=False, headers={
            "Content-Range": f"bytes {first}-{len(data) - 1}/{len(data)}"}) as resp:
        assert resp.status == 503, await resp.text()
        assert int(resp.headers["Retry-After"]) > 0
        assert (await resp.json())["error"] == "overloaded"
    assert budget.timeouts == 1
    # What the request had read before it gave up is in the upload.
    resp = await probe(http, url, str(len(data)))
    assert resp.status == 308
    kept = int(resp.headers["Range"].rsplit("-", 1)[1]) + 1
    assert first < kept <= first + READ_BOUND
    holder.go.set()
    assert await holder.task == 200
    resp = await put_range(http, url, data[kept:], kept, len(data))
    assert resp.status == 200
    assert stored(s3_client, bucket, "late.bin") == data
    assert json.loads(await _object_doc(http, url))["crc32c"] == crc_b64(data)
    assert (budget.held, budget.waiting) == (0, 0)


async def test_a_request_waiting_for_memory_lets_a_new_one_take_over_at_once(
        proxies, http, s3_client, bucket) -> None:
    # Without the stop the takeover would wait takeover_timeout, then 503.
    proxy = await proxies.start(storage={"takeover_timeout": 5, "budget_wait": 60})
    budget: MemoryBudget = proxy.app[keys.BUDGET]
    holder = Holder(http, f"{proxy.url}/upload/holder.bin", os.urandom(PART + MIB))
    await until(lambda: budget.held >= PART, "the holder took its part buffer")
    waiting = RawUpload(proxy.port, "taken.bin", os.urandom(2 * PART))
    try:
        await until(lambda: budget.waiting == 1, "the upload waits for memory")
        url = f"{proxy.url}/upload/taken.bin"
        resp = await probe(http, url, str(len(waiting.data)))
        assert resp.status == 308, resp.headers
        assert proxy.app[keys.WRITERS].takeovers == 1
        kept = int(resp.headers["Range"].rsplit("-", 1)[1]) + 1
        assert 0 < kept <= READ_BOUND
        assert (budget.waiting, budget.timeouts) == (0, 0)
    finally:
        waiting.close()
    holder.go.set()
    assert await holder.task == 200
    resp = await put_range(http, url, waiting.data[kept:], kept, len(waiting.data))
    assert resp.status == 200
    assert stored(s3_client, bucket, "taken.bin") == waiting.data
    assert budget.held == 0


async def test_shutdown_ends_a_wait_for_memory_and_keeps_what_was_read(
        proxies, http, s3_client, bucket) -> None:
    proxy = await proxies.start(storage={"budget_wait": 60})
    budget: MemoryBudget = proxy.app[keys.BUDGET]
    # The test holds the whole budget (as uploads stuck in S3 calls would):
    # shutting down frees none of it.
    await budget.acquire(budget.limit)
    waiting = RawUpload(proxy.port, "shut.bin", os.urandom(2 * PART))
    try:
        await until(lambda: budget.waiting == 1, "the upload waits for memory")
        await proxy.stop()
    finally:
        waiting.close()
    # Without the stop the wait would outlast the shutdown and be cancelled,
    # losing the chunk the request had read.
    again = await proxies.start()
    resp = await probe(http, f"{again.url}/upload/shut.bin", str(len(waiting.data)))
    assert resp.status == 308
    kept = int(resp.headers["Range"].rsplit("-", 1)[1]) + 1
    assert 0 < kept <= READ_BOUND
    resp = await put_range(http, f"{again.url}/upload/shut.bin", waiting.data[kept:], kept,
                           len(waiting.data))
    assert resp.status == 200
    assert stored(s3_client, bucket, "shut.bin") == waiting.data


async def _object_doc(http: aiohttp.ClientSession, url: str) -> str:
    async with http.put(url, headers={"Content-Range": "bytes */*"}) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_fifty_uploads_at_once_through_a_budget_of_three_parts(
        proxies, http, s3_client, bucket) -> None:
    proxy = await proxies.start(storage={"memory_budget": 3 * PART, "parts_in_flight": 2,
                                         "budget_wait": 120})
    budget: MemoryBudget = proxy.app[keys.BUDGET]
    rng = random.Random(11)
    payloads = {f"many/{i}.bin": rng.randbytes(rng.randrange(3 * MIB, 7 * MIB))
                for i in range(50)}

    async def upload(name: str, data: bytes) -> int:
        url = f"{proxy.url}/upload/{name}"
        if len(data) % 2:
            # Two Content-Range chunks: the first one staged, then a part.
            half = len(data) // 2
            resp = await put_range(http, url, data[:half], 0, len(data))
            assert resp.status == 308
            return (await put_range(http, url, data[half:], half, len(data))).status
        async with http.put(url, data=data) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(upload(n, d) for n, d in payloads.items()))
    assert statuses == [200] * len(payloads)
    for name, data in payloads.items():
        assert stored(s3_client, bucket, name) == data, name
    assert budget.peak <= budget.limit
    assert (budget.held, budget.waiting, budget.timeouts) == (0, 0, 0)


async def test_a_body_held_for_its_checksum_takes_its_memory_before_it_is_read(
        proxies, http, s3_client, bucket) -> None:
    # The wait is what is tested: a short one.
    proxy = await proxies.start(storage={"budget_wait": 0.5})
    budget: MemoryBudget = proxy.app[keys.BUDGET]
    data = os.urandom(MIB)
    url = await tus.create(http, proxy, len(data), **{"Upload-Metadata": tus.meta(name="c.bin")})
    checksum = {"Upload-Checksum": f"crc32c {crc_b64(data)}"}
    holder = Holder(http, f"{proxy.url}/upload/holder.bin", os.urandom(2 * MIB))
    await until(lambda: budget.held >= 2 * MIB, "the holder took its buffer")
    # 2 MiB held, 1 MiB for the body and a part's room left free: no fit.
    resp = await tus.patch(http, url, data, 0, **checksum)
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert (await tus.head(http, url)).headers["Upload-Offset"] == "0"
    holder.go.set()
    assert await holder.task == 200
    resp = await tus.patch(http, url, data, 0, **checksum)
    assert resp.status == 204
    assert resp.headers["Upload-Offset"] == str(len(data))
    assert stored(s3_client, bucket, "tus/c.bin") == data
    assert (budget.held, budget.waiting) == (0, 0)


@pytest.mark.parametrize("dialect", [OurDialect(), TusDialect(Config().tus),
                                     IetfDialect(Config()), GcsDialect(Config().gcs)],
                         ids=["ours", "tus", "ietf", "gcs"])
def test_every_dialect_answers_overloaded_with_503_and_retry_after(dialect) -> None:
    response = dialect.render_error(Overloaded("no memory"))
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
