"""Several server processes on one bucket (issue 12): any instance continues
any upload, a request on one instance takes an upload over from another (live,
killed or frozen), and no interleaving loses an acknowledged byte or stores a
mix of two clients' bytes.

Three real ``python -m app`` processes share one moto server through an
``S3Gate`` (one tagged listener each; the gate makes conditional writes atomic
as S3 does, logs every request and holds the ones a test names). Interleavings
are made with events, byte counts and held requests; the only waits on time
are deadlines, the leases' own expiry (the behaviour under test) and a
client's pause for ``Retry-After``. Figures (timings, S3 requests, the chaos
run's counts) are printed, never asserted: ``-s`` shows them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import google_crc32c
import pytest

from app.config.model import StorageConfig
from app.core.protocol import id_session_name
from app.stores.s3.records import Layout
from tests.conftest import phase_reports
from tests.cut_relay import CuttingRelay
from tests.instances import AppProcess, Cluster
from tests.relay import TcpRelay
from tests.s3_gate import S3Gate, Seen

MIB = 1024 * 1024
PREFIX = "uploads/"
LAYOUT = Layout(PREFIX)
#: Short, so a dead holder's lease runs out within a test; the takeover bound
#: stays at its default of 10 s, well above it.
LEASE_TTL = 3.0
#: Where the implementation is not there yet, the key is unknown and a server
#: with it would refuse to start; without it the tests still run (and show
#: what fails without leases).
LEASES = "lease_ttl" in {f.name for f in dataclasses.fields(StorageConfig)}
LEASE_ENV = {"APP__STORAGE__LEASE_TTL": f"{LEASE_TTL:g}s"} if LEASES else {}
#: Every wait in this module ends by then: a missing behaviour fails quickly.
DEADLINE = 30.0


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(
    gate: S3Gate, bucket: str, http: aiohttp.ClientSession, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[MakeCluster]:
    made: list[Cluster] = []

    async def make(n: int = 3, **env: str) -> Cluster:
        log_dir = tmp_path / f"cluster{len(made)}"
        log_dir.mkdir()
        cluster = Cluster(gate, bucket, log_dir, n, part_size="5MiB",
                          **{**LEASE_ENV, **env})
        made.append(cluster)
        await cluster.start(http)
        return cluster

    yield make
    for cluster in made:
        await cluster.close()
    call = request.node.stash.get(phase_reports, {}).get("call")
    if call is None or call.failed:
        for cluster in made:
            print(cluster.logs())
        print(gate_summary(gate))


@pytest.fixture
async def cluster(make_cluster: MakeCluster) -> Cluster:
    return await make_cluster()


# -- a client of our dialect -----------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    """One answer, or why there was none (``status`` None)."""

    status: int | None
    headers: Mapping[str, str]
    doc: dict[str, Any] | None
    error: str = ""
    elapsed: float = 0.0

    @property
    def offset(self) -> int | None:
        """The stored offset a 308 or 409 states (a 308 without ``Range``: 0)."""
        rng = self.headers.get("Range")
        if rng is None:
            return 0 if self.status == 308 else None
        assert rng.startswith("bytes=0-"), rng
        return int(rng.removeprefix("bytes=0-")) + 1

    def __str__(self) -> str:
        if self.status is None:
            return f"no answer ({self.error}) after {self.elapsed:.2f}s"
        extra = self.headers.get("Range") or (json.dumps(self.doc) if self.doc else "")
        return f"{self.status} {extra} after {self.elapsed:.2f}s"


async def put(http: aiohttp.ClientSession, url: str, data: Any = None,
              **headers: str) -> Reply:
    started = time.monotonic()
    try:
        async with http.put(url, data=data, headers=headers, allow_redirects=False) as resp:
            raw = await resp.read()
            doc = json.loads(raw) if raw and resp.content_type == "application/json" else None
            return Reply(resp.status, dict(resp.headers), doc,
                         elapsed=time.monotonic() - started)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Reply(None, {}, None, error=repr(exc), elapsed=time.monotonic() - started)


def url_of(server: AppProcess | str, name: str) -> str:
    base = server if isinstance(server, str) else server.url
    return f"{base}/upload/{name}"


async def send_chunk(http: aiohttp.ClientSession, server: AppProcess | str, name: str,
                     data: Any, start: int, length: int, total: int | None,
                     **headers: str) -> Reply:
    """``data`` (bytes or an async iterator of them) as bytes ``[start, start + length)``."""
    total_text = "*" if total is None else str(total)
    return await put(http, url_of(server, name), data, **{
        "Content-Range": f"bytes {start}-{start + length - 1}/{total_text}",
        "Content-Length": str(length), **headers})


async def probe(http: aiohttp.ClientSession, server: AppProcess | str, name: str) -> Reply:
    return await put(http, url_of(server, name), **{"Content-Range": "bytes */*"})


def crc_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def describes(doc: dict[str, Any] | None, data: bytes) -> bool:
    """Whether a completion JSON states ``data``'s size and digests."""
    return (doc is not None and doc.get("size") == len(data)
            and doc.get("crc32c") == crc_b64(data)
            and doc.get("md5Hash", md5_b64(data)) == md5_b64(data))


def difference(stored: bytes | None, data: bytes) -> str | None:
    """None if equal; otherwise where they differ (never the bytes: they are MiBs)."""
    if stored is None:
        return "no object stored"
    if stored == data:
        return None
    at = next((i for i, (a, b) in enumerate(zip(stored, data, strict=False)) if a != b),
              min(len(stored), len(data)))
    return f"stored {len(stored)} bytes, expected {len(data)}; first difference at {at}"


async def pieces(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def wait_for(event: asyncio.Event, what: str, timeout: float = DEADLINE) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout:g}s") from None


async def either(*events: asyncio.Event, timeout: float = DEADLINE) -> None:
    """Until one of ``events`` is set."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


# -- S3 as moto holds it, and as the gate saw it ----------------------------------------------


def object_path(bucket: str, name: str) -> str:
    return f"/{bucket}/{PREFIX}{name}"


def record_path(bucket: str, name: str) -> str:
    return f"/{bucket}/{LAYOUT.record_key(name)}"


def is_write(seen: Seen) -> bool:
    return seen.method in ("PUT", "POST", "DELETE")


def op_name(seen: Seen) -> str:
    q = seen.query
    if seen.is_upload_part():
        return "UploadPart"
    if seen.method == "POST" and "uploads" in q:
        return "CreateMultipartUpload"
    if seen.method == "POST" and "uploadId" in q:
        return "CompleteMultipartUpload"
    if seen.method == "GET" and "uploadId" in q:
        return "ListParts"
    if seen.method == "DELETE" and "uploadId" in q:
        return "AbortMultipartUpload"
    where = ("record" if "/.uploads/sessions/" in seen.path
             else "staged" if "/.uploads/staged/" in seen.path
             else "reserved" if "/.uploads/" in seen.path
             else "object" if seen.path.count("/") > 1 else "bucket")
    cond = " (conditional)" if seen.conditional else ""
    return f"{seen.method} {where}{cond}"


def gate_summary(gate: S3Gate) -> str:
    by_tag: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for seen in gate.log:
        by_tag[seen.tag][f"{op_name(seen)} -> {seen.status}"] += 1
    lines = ["===== S3 requests through the gate, by tag ====="]
    for tag, counts in sorted(by_tag.items()):
        lines.append(f"{tag}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def touches(seen: Seen, bucket: str, name: str) -> bool:
    """A request about this upload: its object (and multipart upload), its
    record, or staged data (tests that use this have one upload at a time)."""
    return (seen.path in (object_path(bucket, name), record_path(bucket, name))
            or seen.path.startswith(f"/{bucket}/{LAYOUT.staged_root}"))


class Bucket:
    """Reads straight from moto (not through the gate, which the test's own
    event loop serves), in a thread so the servers' S3 traffic keeps flowing."""

    def __init__(self, s3_client: Any, name: str) -> None:
        self.s3 = s3_client
        self.name = name

    async def read(self, name: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                return self.s3.get_object(Bucket=self.name, Key=PREFIX + name)["Body"].read()
            except self.s3.exceptions.NoSuchKey:
                return None
        return await asyncio.to_thread(get)

    async def state(self, name: str) -> dict[str, Any]:
        """What a stale writer could change: the object, the session record,
        every multipart upload under the prefix with its parts, staged data."""
        def get() -> dict[str, Any]:
            state: dict[str, Any] = {}
            try:
                obj = self.s3.get_object(Bucket=self.name, Key=PREFIX + name)
                state["object"] = (obj["ETag"], hashlib.sha256(obj["Body"].read()).hexdigest())
            except self.s3.exceptions.NoSuchKey:
                state["object"] = None
            try:
                state["record"] = self.s3.head_object(
                    Bucket=self.name, Key=LAYOUT.record_key(name))["ETag"]
            except self.s3.exceptions.ClientError:
                state["record"] = None
            uploads = self.s3.list_multipart_uploads(Bucket=self.name, Prefix=PREFIX)
            state["multipart"] = {
                (u["Key"], u["UploadId"]): [
                    (p["PartNumber"], p["ETag"], p["Size"]) for p in self.s3.list_parts(
                        Bucket=self.name, Key=u["Key"], UploadId=u["UploadId"]
                    ).get("Parts", [])]
                for u in uploads.get("Uploads", [])}
            staged = self.s3.list_objects_v2(Bucket=self.name, Prefix=LAYOUT.staged_root)
            state["staged"] = sorted((o["Key"], o["ETag"]) for o in staged.get("Contents", []))
            return state
        return await asyncio.to_thread(get)


@pytest.fixture
def store(s3_client: Any, bucket: str) -> Bucket:
    return Bucket(s3_client, bucket)


# -- (a) every chunk on another instance -----------------------------------------------------


async def test_every_chunk_on_another_instance_100mib(cluster, http, store, gate) -> None:
    total = 100 * MIB
    data = random.Random(100).randbytes(total)
    name = "round-robin/100mib.bin"
    costs: list[list[str]] = []  # each chunk's S3 requests, from the instance it went to
    probe_cost: list[str] = []
    started = time.monotonic()
    for k in range(total // MIB):
        server = cluster[k % len(cluster)]
        before = time.monotonic()
        reply = await send_chunk(http, server, name, data[k * MIB:(k + 1) * MIB], k * MIB,
                                 MIB, total)
        costs.append([op_name(s) for s in cluster.seen(server.tag, since=before)
                      if touches(s, store.name, name)])
        if k < total // MIB - 1:
            assert (reply.status, reply.offset) == (308, (k + 1) * MIB), (k, str(reply))
        else:
            assert reply.status == 200, str(reply)
            assert describes(reply.doc, data), reply.doc
        if k == total // MIB // 2:
            other = cluster[(k + 1) % len(cluster)]
            before = time.monotonic()
            reply = await probe(http, other, name)
            assert (reply.status, reply.offset) == (308, (k + 1) * MIB), str(reply)
            probe_cost = [op_name(s) for s in cluster.seen(other.tag, since=before)
                          if touches(s, store.name, name)]
    elapsed = time.monotonic() - started
    assert difference(await store.read(name), data) is None
    servers = {s.tag for s in gate.log if s.is_upload_part()}
    assert servers == set(cluster.tags), servers  # every instance wrote parts
    counts = [len(c) for c in costs]
    typical = collections.Counter(tuple(c) for c in costs).most_common(1)[0][0]
    print(f"\n100 MiB in 1 MiB chunks round robin over {len(cluster)} instances: "
          f"{elapsed:.1f}s; S3 requests per chunk min {min(counts)}, median "
          f"{statistics.median(counts)}, max {max(counts)}; the usual chunk: {list(typical)}; "
          f"the dearest: {max(costs, key=len)}; a probe of the unfinished upload on "
          f"another instance: {probe_cost}")


# -- probes never take the lease ------------------------------------------------------------


class Stalled:
    """A body that sends ``first``, then waits for ``go_on`` before ``rest``:
    a phone whose network went away mid-request (``paused`` is set then)."""

    def __init__(self, first: bytes, rest: bytes = b"") -> None:
        self.first, self.rest = first, rest
        self.paused = asyncio.Event()
        self.go_on = asyncio.Event()

    async def body(self) -> AsyncIterator[bytes]:
        async for piece in pieces(self.first):
            yield piece
        self.paused.set()
        await self.go_on.wait()
        async for piece in pieces(self.rest):
            yield piece


TUS = {"Tus-Resumable": "1.0.0"}


async def tus_patch(http: aiohttp.ClientSession, url: str, data: Any, offset: int,
                    length: int) -> Reply:
    started = time.monotonic()
    try:
        async with http.patch(url, data=data, headers={
                **TUS, "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": str(offset), "Content-Length": str(length)}) as resp:
            await resp.read()
            return Reply(resp.status, dict(resp.headers), None,
                         elapsed=time.monotonic() - started)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Reply(None, {}, None, error=repr(exc), elapsed=time.monotonic() - started)


@pytest.mark.parametrize("dialect", ["ours", "tus"])
async def test_a_probe_on_another_instance_reads_the_record_and_takes_nothing(
        cluster, http, store, dialect) -> None:
    total = 8 * MIB
    data = random.Random(8).randbytes(total)
    a, b = cluster[0], cluster[1]
    stalled = Stalled(data[2 * MIB:3 * MIB], data[3 * MIB:])
    if dialect == "ours":
        name = "probe/held.bin"
        record = record_path(store.name, name)
        reply = await send_chunk(http, a, name, data[:2 * MIB], 0, 2 * MIB, total)
        assert reply.offset == 2 * MIB, str(reply)
        writing = asyncio.create_task(
            send_chunk(http, a, name, stalled.body(), 2 * MIB, total - 2 * MIB, total))
    else:
        async with http.post(f"{a.url}/files/",
                             headers={**TUS, "Upload-Length": str(total)}) as resp:
            assert resp.status == 201, await resp.text()
            path = "/files/" + resp.headers["Location"].rsplit("/", 1)[1]
        record = record_path(store.name, id_session_name("tus", path.rsplit("/", 1)[1]))
        reply = await tus_patch(http, a.url + path, data[:2 * MIB], 0, 2 * MIB)
        assert reply.status == 204, str(reply)
        writing = asyncio.create_task(
            tus_patch(http, a.url + path, stalled.body(), 2 * MIB, total - 2 * MIB))
    await wait_for(stalled.paused, "the body's first MiB was not taken")
    since = time.monotonic()
    if dialect == "ours":
        reply = await probe(http, b, name)
        assert reply.status == 308 and 2 * MIB <= reply.offset <= 3 * MIB, str(reply)
    else:
        async with http.head(b.url + path, headers=TUS) as resp:
            assert resp.status == 200
            assert 2 * MIB <= int(resp.headers["Upload-Offset"]) <= 3 * MIB
    on_b = cluster.seen(b.tag, since=since)
    # No write of any kind (no lease, no takeover request), and the running
    # request was not disturbed...
    assert not [s for s in on_b if is_write(s)], [op_name(s) for s in on_b]
    assert not writing.done()
    # ... and one S3 request, a read of the record (bucket-level requests
    # are the readiness check's).
    assert [(s.method, s.path) for s in on_b if not s.path.endswith(f"/{store.name}")] == [
        ("GET", record)], [op_name(s) for s in on_b]
    stalled.go_on.set()
    async with asyncio.timeout(DEADLINE):
        reply = await writing
    if dialect == "ours":
        assert reply.status == 200 and describes(reply.doc, data), str(reply)
        assert difference(await store.read(name), data) is None
    else:
        assert reply.status == 204 and reply.headers["Upload-Offset"] == str(total), str(reply)


# -- takeover from a live holder ------------------------------------------------------------


@pytest.mark.parametrize("stalled_at", ["mid_first_part", "after_a_part"])
async def test_a_chunk_on_another_instance_takes_over_a_stalled_request(
        cluster, http, store, gate, stalled_at) -> None:
    """The phone's old request hangs on instance A (half-open connection); it
    reconnects through the load balancer to B. B asks A to let go, A persists
    what it received and answers its (gone) client as an in-process takeover
    does, and B continues. A stalls with 2 MiB of a part received, or just
    after it uploaded a part (with 1 MiB of the next one received)."""
    total = 9 * MIB
    data = random.Random(9).randbytes(total)
    name = f"takeover/{stalled_at}.bin"
    a, b = cluster[0], cluster[1]
    assert (await send_chunk(http, a, name, data[:MIB], 0, MIB, total)).offset == MIB
    upto = 3 * MIB if stalled_at == "mid_first_part" else 6 * MIB
    part = gate.watch(lambda s: s.tag == a.tag and s.is_upload_part()
                      and s.path == object_path(store.name, name))
    # A's request takes the lease once it has run a moment (mid part, so
    # that it can be asked), or to upload part 1; B's request comes after.
    leased = gate.watch(lambda s: s.tag == a.tag and s.method == "PUT" and s.conditional
                        and s.path == record_path(store.name, name))
    stalled = Stalled(data[MIB:upto], data[upto:])
    old = asyncio.create_task(send_chunk(http, a, name, stalled.body(), MIB, total - MIB, total))
    await wait_for(stalled.paused, "the old request's first bytes were not taken")
    await wait_for(leased.done, "instance A never took the lease of its request")
    if stalled_at == "after_a_part":
        await wait_for(part.done, "instance A never uploaded part 1")
    # The bytes A holds are not acknowledged yet, so a probe may report less.
    offset = (await probe(http, b, name)).offset
    assert offset is not None and offset >= MIB
    started = time.monotonic()
    new = await send_chunk(http, b, name, data[offset:], offset, total - offset, total)
    took = time.monotonic() - started
    try:
        assert new.status == 200 and describes(new.doc, data), str(new)
        # A let go before B could write, so it has answered by now (waited
        # on without cancelling it, to see what it answers otherwise).
        await asyncio.wait({old}, timeout=5)
        if not old.done():
            stalled.go_on.set()  # the client goes on: what does A make of it?
            async with asyncio.timeout(DEADLINE):
                late = await old
            raise AssertionError(
                f"instance A still held the old request {took:.2f}s after B started and "
                f"completed the upload: it was never asked to let go (once its client "
                f"went on, it answered {late})")
        old_reply = old.result()
    finally:
        stalled.go_on.set()
    # The same answer as an in-process takeover: an interrupted body, 308 with
    # what A stored of it, which the client may probe and resume from.
    assert old_reply.status == 308, str(old_reply)
    assert MIB <= old_reply.offset <= upto, str(old_reply)
    assert difference(await store.read(name), data) is None
    print(f"\ntakeover of a live holder stalled {stalled_at}: the new request answered "
          f"in {took:.2f}s; the old request was told {old_reply}")


# -- (b) two clients race one upload --------------------------------------------------------


HEAD = 2 * MIB  # resumed uploads: what was acknowledged before the race


async def race_body(data: bytes, mine: asyncio.Event, theirs: asyncio.Event,
                    their_answer: asyncio.Event) -> AsyncIterator[bytes]:
    """``data``, pausing after half of it until the other client has sent half
    of its own (or has its answer): the two bodies overlap for sure."""
    half = len(data) // 2
    async for piece in pieces(data[:half]):
        yield piece
    mine.set()
    await either(theirs, their_answer)
    async for piece in pieces(data[half:]):
        yield piece


async def race_client(http: aiohttp.ClientSession, server: AppProcess, name: str, mode: str,
                      data: bytes, start: int, halves: tuple[asyncio.Event, asyncio.Event],
                      answered: tuple[asyncio.Event, asyncio.Event]) -> Reply:
    """One racer: ``data`` from ``start`` to the end, as a plain PUT (whole)
    or as the chunk that resumes a session; ``halves`` and ``answered`` are
    (mine, the other's)."""
    try:
        body = race_body(data[start:], halves[0], halves[1], answered[1])
        # Each states its object's digest, as Google's clients do on their
        # last request: a mix of two clients' bytes cannot pass for either.
        digest = {"x-goog-hash": f"crc32c={crc_b64(data)}"}
        if mode == "whole":
            return await put(http, url_of(server, name), body,
                             **{"Content-Length": str(len(data))}, **digest)
        return await send_chunk(http, server, name, body, start, len(data) - start, len(data),
                                **digest)
    finally:
        answered[0].set()


ACCEPTABLE = {200, 308, 400, 409, 412, 503}


@pytest.mark.parametrize("same", [True, False], ids=["same-bytes", "different-bytes"])
@pytest.mark.parametrize("mode", ["whole", "resume"])
async def test_two_clients_race_one_upload_on_two_instances(
        cluster, http, store, gate, mode, same) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    for trial in range(5):
        rng = random.Random(f"{mode}-{same}-{trial}")
        size = rng.randint(7 * MIB, 13 * MIB)
        name = f"race/{mode}-{'same' if same else 'different'}-{trial}.bin"
        first = rng.randbytes(size)
        if same:
            second = first
        elif mode == "resume":
            second = first[:HEAD] + rng.randbytes(size - HEAD)  # they share the acknowledged head
        else:
            second = rng.randbytes(size)
        datas = (first, second)
        servers = (cluster[trial % 3], cluster[(trial + 1) % 3])
        start = 0
        if mode == "resume":
            reply = await send_chunk(http, servers[0], name, first[:HEAD], 0, HEAD, size)
            assert reply.offset == HEAD, str(reply)
            start = HEAD
        halves = (asyncio.Event(), asyncio.Event())
        answered = (asyncio.Event(), asyncio.Event())
        async with asyncio.timeout(2 * DEADLINE):
            replies = await asyncio.gather(*(
                race_client(http, servers[i], name, mode, datas[i], start,
                            (halves[i], halves[1 - i]), (answered[i], answered[1 - i]))
                for i in (0, 1)))
        stored = await store.read(name)
        after = await probe(http, cluster[(trial + 2) % 3], name)
        context = (f"trial {trial} ({size} bytes): first on {servers[0].tag} got {replies[0]}, "
                   f"second on {servers[1].tag} got {replies[1]}; probe: {after}; "
                   f"stored: {difference(stored, first)} / {difference(stored, second)}")
        outcomes[" + ".join(sorted(str(r.status) for r in replies))] += 1

        # Exactly one client's bytes, never a mix.
        assert stored is None or stored in datas, context
        winners = [i for i in (0, 1) if replies[i].status == 200]
        for r in replies:
            assert r.status is not None, context  # a clear answer, not a dropped connection
            assert r.status in ACCEPTABLE, context
            if r.status == 503:
                assert "Retry-After" in r.headers, context
            if r.status not in (200, 308):
                assert r.doc is not None and "error" in r.doc, context
            if r.status == 308:
                assert r.offset <= size, context
        if mode == "resume" or same:
            # One session: every 200 states the object that is stored.
            for i in winners:
                assert stored is not None and describes(replies[i].doc, stored), context
        else:
            # Two plain PUTs are two uploads: a 200 states that client's own
            # object, and the one stored is the one completed last.
            for i in winners:
                assert describes(replies[i].doc, datas[i]), context
            if stored is not None:
                completions = [s for s in gate.log if s.path == object_path(store.name, name)
                               and op_name(s) == "CompleteMultipartUpload" and s.status == 200]
                assert completions, context
                last = next(i for i in (0, 1) if servers[i].tag == completions[-1].tag)
                assert stored == datas[last] and last in winners, context
        if same or mode == "whole":
            assert winners and stored is not None, context  # someone always gets through
        else:
            # Two clients resuming one session with different bytes: the one
            # that came second continues after what the first stored, and the
            # digest it states refuses the mix; or one of them is stored whole.
            assert (stored is not None) == bool(winners), context
        if stored is not None:
            assert after.status == 200 and describes(after.doc, stored), context
        else:
            assert after.status in (308, 404), context
    print(f"\n{mode}, {'same' if same else 'different'} bytes: outcomes {dict(outcomes)}")


# -- (c) a holder killed mid-part -----------------------------------------------------------


@pytest.mark.parametrize("held", ["part_upload", "client_body", "beyond_takeover_timeout"])
async def test_a_holder_killed_mid_part_is_taken_over_after_its_lease_expires(
        make_cluster, http, store, gate, held) -> None:
    if held == "beyond_takeover_timeout":
        # The dead holder's lease outlives the takeover bound: 503 with
        # Retry-After, and the client's retry gets through.
        cluster = await make_cluster(2, APP__STORAGE__TAKEOVER_TIMEOUT="1s",
                                     **({"APP__STORAGE__LEASE_TTL": "6s"} if LEASES else {}))
    else:
        cluster = await make_cluster(2)
    a, b = cluster[0], cluster[1]
    total = 12 * MIB
    data = random.Random(f"kill-{held}").randbytes(total)
    name = f"kill/{held}.bin"
    acked = (await send_chunk(http, a, name, data[:2 * MIB], 0, 2 * MIB, total)).offset
    assert acked == 2 * MIB
    rest = data[acked:]
    relay: TcpRelay | None = None
    if held == "client_body":
        # A has 2 MiB of the chunk (in memory, short of a part) when it dies.
        relay = TcpRelay("127.0.0.1", a.port, hold_after=2 * MIB)
        relay.start()
        writing = asyncio.create_task(
            send_chunk(http, relay.url, name, rest, acked, len(rest), total))
        if not await asyncio.to_thread(relay.held.wait, DEADLINE):
            raise AssertionError("the relay never passed 2 MiB to instance A")
    else:
        # A has filled part 1 and is uploading it: the gate holds it.
        part = gate.hold(lambda s: s.tag == a.tag and s.is_upload_part()
                         and s.path == object_path(store.name, name))
        writing = asyncio.create_task(
            send_chunk(http, a, name, rest, acked, len(rest), total))
        await wait_for(part.arrived, "instance A never uploaded a part")
    try:
        killed = time.monotonic()
        await a.kill()
        assert (await writing).status is None  # its client lost the connection
        reply = await probe(http, b, name)
        probe_took = time.monotonic() - killed
        assert reply.status == 308 and reply.offset >= acked, str(reply)  # nothing acked lost
        offset = reply.offset
        attempts: list[Reply] = []
        resumed = time.monotonic()
        async with asyncio.timeout(DEADLINE):
            while True:
                reply = await send_chunk(http, b, name, data[offset:], offset, total - offset,
                                         total)
                attempts.append(reply)
                if reply.status != 503:
                    break
                assert "Retry-After" in reply.headers, str(reply)
                # The client does what Retry-After tells it (capped to keep the test short).
                await asyncio.sleep(min(float(reply.headers["Retry-After"]), 2.0))
        done = time.monotonic()
        assert reply.status == 200 and describes(reply.doc, data), [str(r) for r in attempts]
        assert difference(await store.read(name), data) is None
        if held == "beyond_takeover_timeout":
            assert attempts[0].status == 503, [str(r) for r in attempts]
        first_write = min((s.at for s in cluster.seen(b.tag, since=resumed)
                           if is_write(s) and touches(s, store.name, name)), default=done)
        print(f"\nkill -9 of the holder ({held}): probe on another instance after "
              f"{probe_took:.2f}s; the chunk sent {resumed - killed:.2f}s after the kill "
              f"wrote its first byte {first_write - resumed:.2f}s later and completed "
              f"{done - killed:.2f}s after the kill; answers {[str(r) for r in attempts]}")
        if held != "client_body":
            # The dead process's part upload lands late: the object stays as it is.
            gate.clear()
            await wait_for(part.forwarded, "the late part upload")
            assert difference(await store.read(name), data) is None
    finally:
        if relay is not None:
            relay.stop()


# -- (d) a holder frozen past its lease -----------------------------------------------------


async def test_a_holder_frozen_past_its_lease_writes_nothing_after_it_thaws(
        cluster, http, store, gate) -> None:
    total = 12 * MIB
    data = random.Random("frozen").randbytes(total)
    stale = random.Random("stale").randbytes(total - 6 * MIB)
    name = "frozen/writer.bin"
    a, b = cluster[0], cluster[1]
    assert (await send_chunk(http, cluster[2], name, data[:2 * MIB], 0, 2 * MIB,
                             total)).offset == 2 * MIB
    # A reads to 6 MiB (part 1 is full and uploaded), then its client stalls;
    # what that client sends after the thaw differs from the upload's bytes,
    # so anything A made of it would show.
    part1 = gate.watch(lambda s: s.tag == a.tag and s.is_upload_part()
                       and s.path == object_path(store.name, name))
    stalled = Stalled(data[2 * MIB:6 * MIB], stale)
    old = asyncio.create_task(
        send_chunk(http, a, name, stalled.body(), 2 * MIB, total - 2 * MIB, total))
    await wait_for(part1.done, "instance A never uploaded part 1")
    await wait_for(stalled.paused, "instance A did not take the first 4 MiB")
    a.pause()
    frozen = time.monotonic()
    try:
        offset = (await probe(http, b, name)).offset
        assert offset is not None and offset >= 2 * MIB
        async with asyncio.timeout(DEADLINE):
            while True:
                reply = await send_chunk(http, b, name, data[offset:], offset, total - offset,
                                         total)
                if reply.status != 503:
                    break
                await asyncio.sleep(min(float(reply.headers.get("Retry-After", 1)), 2.0))
        took_over = time.monotonic() - frozen
        assert reply.status == 200 and describes(reply.doc, data), str(reply)
        before = await store.state(name)
        thawed = time.monotonic()
    finally:
        a.resume()
    stalled.go_on.set()
    async with asyncio.timeout(DEADLINE):
        old_reply = await old
    # A answers a probe after its old request ended: whatever that request
    # would still do right after its answer has had its turn.
    assert (await probe(http, a, name)).status == 200
    after = await store.state(name)
    late = [s for s in cluster.seen(a.tag, since=thawed) if is_write(s)]
    shown = [f"{op_name(s)} -> {s.status}" for s in late]
    print(f"\nfrozen holder: B completed {took_over:.2f}s after the freeze; "
          f"A's client was told {old_reply}; A's writes after the thaw: {shown}")
    # Nothing the stale writer did took effect: S3 accepted no write of it,
    # it started no part upload or completion (UploadPart takes no
    # condition), and the object, multipart uploads and record are as B left them.
    harmful = [f"{op_name(s)} -> {s.status}" for s in late if s.status is None
               or s.status < 300 or op_name(s) in (
                   "UploadPart", "CompleteMultipartUpload", "CreateMultipartUpload")]
    assert not harmful, f"the stale writer wrote after it thawed: {harmful}"
    assert (after["object"], after["multipart"]) == (before["object"], before["multipart"])
    assert set(after["staged"]) <= set(before["staged"])  # the winner may clear its own
    if not [s for s in cluster.seen(since=thawed) if s.method == "PUT"
            and s.path == record_path(store.name, name) and (s.status or 0) < 300]:
        assert after["record"] == before["record"]
    assert difference(await store.read(name), data) is None
    assert old_reply.status is not None, str(old_reply)
    assert old_reply.status != 500, str(old_reply)
    if old_reply.status == 200:
        assert describes(old_reply.doc, data), str(old_reply)
    # And it does not even try: its lease ran out while it was frozen, which
    # its own clock tells it, so it has no record write to attempt either.
    assert not shown, f"the stale writer attempted writes (S3 refused them): {shown}"


# -- (e) chaos --------------------------------------------------------------------------------


@dataclasses.dataclass
class Figures:
    uploads: int = 0
    chunks: int = 0
    cuts: int = 0
    kills: int = 0
    probes: int = 0
    no_answer: int = 0
    takeovers: int = 0
    takeover_times: list[float] = dataclasses.field(default_factory=list)
    statuses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    lost: list[str] = dataclasses.field(default_factory=list)
    overstated: list[str] = dataclasses.field(default_factory=list)
    corrupt: list[str] = dataclasses.field(default_factory=list)


async def test_chaos_cuts_kills_and_random_instances_lose_nothing(
        cluster, http, store, gate) -> None:
    seed = 12
    uploads = 20
    kill_at = (30, 75)  # chunks sent when an instance is killed and restarted
    figures = Figures(uploads=uploads)
    running: dict[str, set[str]] = {tag: set() for tag in cluster.tags}  # tag -> uploads
    orphaned: set[str] = set()  # uploads whose request died with its instance
    restarts: list[asyncio.Task[None]] = []
    everything_sent = asyncio.Event()
    limit = asyncio.Semaphore(4)

    async def kill_and_restart() -> None:
        # Kill the instance whose part upload arrives next, holding it in the
        # gate: that instance holds the upload's lease, which now has to run
        # out before another instance may continue.
        captured: list[Seen] = []

        def part_upload(seen: Seen) -> bool:
            if seen.is_upload_part() and "/chaos/" in seen.path:
                captured.append(seen)
                return True
            return False

        hold = gate.hold(part_upload)
        await either(hold.arrived, everything_sent)
        if captured:
            index = cluster.tags.index(captured[0].tag)
        else:  # no part upload came any more: the busiest instance then
            hold.count = 0
            index = max(range(len(cluster)), key=lambda i: len(running[cluster[i].tag]))
        orphaned.update(running[cluster[index].tag])
        figures.kills += 1
        try:
            await cluster.restart(index, http)
        finally:
            # The dead process's part upload lands late, as one in flight can.
            hold.release()

    def count_chunk() -> None:
        figures.chunks += 1
        if figures.chunks in kill_at:
            restarts.append(asyncio.create_task(kill_and_restart()))

    async def one(index: int) -> None:
        own = random.Random(seed * 1000 + index)
        size = own.randint(3 * MIB, 8 * MIB)
        data = own.randbytes(size)
        name = f"chaos/{index}.bin"
        acked = 0  # the highest offset a server has acknowledged
        offset = 0

        def learn(new: int, where: str) -> None:
            nonlocal acked, offset
            if new < acked:
                figures.lost.append(f"{name}: {where} said {new} after {acked} was acknowledged")
            if new > size:
                figures.overstated.append(f"{name}: {where} said {new} of {size}")
            acked = max(acked, new)
            offset = new

        async with limit:
            while True:
                server = cluster[own.randrange(len(cluster))]
                if offset == size:
                    # Every byte is stored but the upload was not finalized
                    # (the answer to the last chunk was lost): a probe stating
                    # the total finalizes it.
                    figures.probes += 1
                    reply = await put(http, url_of(server, name),
                                      **{"Content-Range": f"bytes */{size}"})
                    figures.statuses[f"{reply.status} (finalize)"] += 1
                    if reply.status == 200:
                        if not describes(reply.doc, data):
                            figures.corrupt.append(f"{name}: finalized as {reply.doc}")
                        break
                    if reply.status in (None, 503):
                        continue
                    figures.corrupt.append(f"{name}: finalizing on {server.tag}: {reply}")
                    break
                piece = data[offset:offset + MIB]
                cut = own.random() < 0.25
                count_chunk()
                was_orphaned = name in orphaned
                running[server.tag].add(name)
                started = time.monotonic()
                try:
                    if cut:
                        figures.cuts += 1
                        cut_after = own.randint(1024, len(piece))
                        async with CuttingRelay(server.port, cut_after=cut_after) as relay:
                            reply = await send_chunk(http, relay.url, name, piece, offset,
                                                     len(piece), size)
                    else:
                        reply = await send_chunk(http, server, name, piece, offset, len(piece),
                                                 size)
                finally:
                    running[server.tag].discard(name)
                figures.statuses[str(reply.status)] += 1
                if was_orphaned and reply.status in (200, 308):
                    figures.takeovers += 1
                    figures.takeover_times.append(time.monotonic() - started)
                    orphaned.discard(name)
                where = f"{server.tag} on bytes {offset}-{offset + len(piece) - 1}"
                if reply.status == 200:
                    if not describes(reply.doc, data):
                        figures.corrupt.append(f"{name}: 200 from {where} says {reply.doc}")
                    break
                if reply.status in (308, 409) and reply.offset is not None:
                    learn(reply.offset, f"{reply.status} from {where}")
                    continue
                if reply.status not in (None, 503):
                    figures.corrupt.append(f"{name}: {where} answered {reply}")
                    break
                # Cut, instance down, or busy: ask any instance where the upload stands.
                figures.no_answer += reply.status is None
                while True:
                    figures.probes += 1
                    asked = cluster[own.randrange(len(cluster))]
                    state = await probe(http, asked, name)
                    if state.status == 200:
                        if not describes(state.doc, data):
                            figures.corrupt.append(f"{name}: probe on {asked.tag}: {state}")
                        return
                    if state.status == 308:
                        learn(state.offset, f"probe on {asked.tag}")
                        break
                    if state.status == 404 and acked == 0:
                        offset = 0  # the first chunk never created the upload
                        break
                    if state.status not in (None, 503):
                        figures.corrupt.append(f"{name}: probe on {asked.tag}: {state}")
                        return
        stored = await store.read(name)
        if (problem := difference(stored, data)) is not None:
            figures.corrupt.append(f"{name}: {problem}")

    started = time.monotonic()
    async with asyncio.timeout(150):
        try:
            await asyncio.gather(*(one(i) for i in range(uploads)))
        finally:
            everything_sent.set()
        await asyncio.gather(*restarts)
    elapsed = time.monotonic() - started
    for index in range(uploads):
        name = f"chaos/{index}.bin"
        own = random.Random(seed * 1000 + index)
        data = own.randbytes(own.randint(3 * MIB, 8 * MIB))
        if (problem := difference(await store.read(name), data)) is not None:
            figures.corrupt.append(f"{name} at the end: {problem}")
    times = ", ".join(f"{t:.2f}s" for t in figures.takeover_times)
    print(f"\nchaos (seed {seed}) in {elapsed:.1f}s: {figures.uploads} uploads, "
          f"{figures.chunks} chunks, {figures.cuts} cuts, {figures.kills} kill -9 + restart, "
          f"{figures.probes} probes, {figures.no_answer} chunks without an answer, "
          f"{figures.takeovers} takeovers of a killed instance's upload ({times}); answers "
          f"{dict(figures.statuses)}; lost acknowledgements {len(figures.lost)}, "
          f"overstated {len(figures.overstated)}, corrupt {len(figures.corrupt)}")
    assert figures.kills == len(kill_at)
    assert not figures.lost, figures.lost
    assert not figures.overstated, figures.overstated
    assert not figures.corrupt, figures.corrupt
