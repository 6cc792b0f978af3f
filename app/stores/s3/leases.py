"""Write leases across instances, kept in the session record (see
``app.core.leases`` for the rules and docs/scaling.md for the guarantees).

UploadPart takes no condition, so a part upload is the one write that a
record's ETag cannot guard: it starts only while this process holds the
upload's lease with ``Timing.margin`` left. Every record write of a holder goes
through ``Leases.put``, which renews the lease in the same conditional write,
so holding costs no extra request while parts flow. A conditional write that
fails because another instance only *asked* for the upload (its id in
``takeover``) is merged and retried, and the write is told to stop; one that
fails because another instance *took* it (a new generation) fences this
writer off with ``OffsetMismatch``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from app.core import leases
from app.core.leases import Lease, Standing, Timing
from app.errors import (
    OffsetMismatch,
    StorageMisconfigured,
    UploadError,
    UploadNotFound,
    WriterBusy,
)
from app.stores.s3.client import S3Client
from app.stores.s3.errors import CONFLICT_CODES, S3Refusal
from app.stores.s3.records import Layout, Record, Records
from app.stores.settle import settled

log = logging.getLogger("app.stores.s3")


@dataclass
class Holding:
    """This process's side of a lease it holds, with the record as it last
    wrote (or merged) it."""

    lease: Lease
    #: Monotonic second the lease ends at, counted from when the write that
    #: granted it was sent.
    deadline: float
    record: Record
    etag: str


@dataclass
class Writing:
    """A request of this process that writes an upload (``Leases.writing``)."""

    stop: Callable[[], None]
    stopped: bool = False
    #: Bytes received since the lease was last renewed: a stalled client's
    #: lease is left to expire, so another instance may take its upload.
    flowed: bool = False
    watcher: asyncio.Task[None] | None = None
    #: Record versions the watcher replaced behind the writer's back (by a
    #: renewal, or by merging a takeover request): the writer's next write
    #: goes over the replacement.
    alias: dict[str, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The record as ``make_way`` read it, until the request's first ``get``.
    fresh: tuple[Record, str] | None = None
    #: The record a write in progress last wrote without the lease, so the
    #: watcher can take the lease over it (see ``_watch``); None: no write.
    base: tuple[Record, str] | None = None
    #: Set once another instance took the upload from this request: it
    #: writes nothing more (every write would be refused anyway).
    fenced: OffsetMismatch | None = None
    #: Part uploads or a completion in progress: the lease is renewed while
    #: they run, as while data flows.
    busy: int = 0

    def request_stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.stop()


class Leases:
    """The leases this process holds, and the conditional writes behind them."""

    def __init__(
        self,
        client: S3Client,
        layout: Layout,
        records: Records,
        instance: str,
        timing: Timing,
        *,
        takeover_timeout: float,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._layout = layout
        self._records = records
        self.instance = instance
        self.timing = timing
        self.enabled = enabled
        self._takeover_timeout = takeover_timeout
        self._clock = clock
        self._monotonic = monotonic
        self._held: dict[str, Holding] = {}
        self._writing: dict[str, Writing] = {}

    def holds(self, name: str) -> bool:
        return name in self._held

    # -- a request that writes --------------------------------------------------

    @asynccontextmanager
    async def writing(self, name: str, stop: Callable[[], None]) -> AsyncIterator[None]:
        """Around a request that may write ``name``: first another instance
        writing it is asked to let go (``WriterBusy`` if it does not in
        the takeover timeout); ``stop`` is called if another instance asks this one.
        A lease still held at the end is released."""
        if not self.enabled:
            yield
            return
        if name in self._writing:
            # Only the engine's one-writer-per-upload hold puts requests in
            # here one at a time; anything else (start-up recovery racing a
            # client) is told to come back.
            raise WriterBusy("this upload is being written by another request; retry shortly")
        entry = Writing(stop)
        self._writing[name] = entry
        try:
            entry.fresh = await self.make_way(name, entry)
            yield
        finally:
            if self._writing.get(name) is entry:
                del self._writing[name]
            await self._stop_watching(entry)
            if name in self._held:
                await self.release_quietly(name)

    def take_fresh(self, name: str) -> tuple[Record, str] | None:
        """The record the request writing ``name`` read a moment ago to make
        way, once: its first ``get`` needs no second GET."""
        entry = self._writing.get(name)
        if entry is None or entry.fresh is None:
            return None
        fresh, entry.fresh = entry.fresh, None
        return fresh

    async def make_way(self, name: str, entry: Writing | None = None
                       ) -> tuple[Record, str] | None:
        """Return once no other instance holds a live lease on ``name``,
        with the record as last read (None if there is none). ``entry``: the
        request waiting, which gives up if it is itself taken over meanwhile."""
        deadline = self._monotonic() + self._takeover_timeout
        while True:
            if entry is not None and entry.stopped:
                raise WriterBusy("a newer request for this upload took over; retry shortly")
            loaded = await self._records.read(name)
            if loaded is None:
                return None
            record, etag = loaded
            lease = record.lease
            if lease is None or leases.standing(lease, self.instance, self._clock()) \
                    is not Standing.HELD:
                return loaded
            left = deadline - self._monotonic()
            if left <= 0:
                raise WriterBusy(
                    "another instance is still saving this upload's data; retry shortly",
                    retry_after=max(1, math.ceil(lease.expires_at - self._clock())),
                )
            if lease.takeover != self.instance:
                log.info("upload %r: asking instance %s to let go (generation %d)",
                         name, lease.holder, lease.generation)
                asked = replace(record, lease=leases.asked(lease, self.instance))
                try:
                    await self._records.put(asked, if_match=etag)
                except OffsetMismatch:
                    continue  # it changed meanwhile: look again
                except UploadNotFound:
                    return None
            await asyncio.sleep(min(self.timing.poll, left))

    # -- the writer's side ----------------------------------------------------------

    def begin_write(self, record: Record, etag: str) -> None:
        """A write of the request writing ``record.name`` starts from
        ``record`` at ``etag``. One that is still running a moment later
        takes the lease even before it needs it for a part: a slow or stalled
        client's request can then be asked to save what it has and let go."""
        entry = self._writing.get(record.name)
        if entry is None:
            return
        entry.base = (record, etag)
        self._start_watching(record.name, entry)

    def end_write(self, name: str) -> None:
        entry = self._writing.get(name)
        if entry is not None:
            entry.base = None

    def check_fenced(self, name: str) -> None:
        """Raise ``OffsetMismatch`` if another instance took ``name`` from
        the request of this process writing it."""
        entry = self._writing.get(name)
        if entry is not None and entry.fenced is not None:
            raise entry.fenced

    @asynccontextmanager
    async def busy(self, name: str) -> AsyncIterator[None]:
        """Around S3 work done under the lease (a part upload, a completion):
        the watcher keeps the lease renewed meanwhile."""
        entry = self._writing.get(name)
        if entry is None:
            yield
            return
        entry.busy += 1
        try:
            yield
        finally:
            entry.busy -= 1

    def note_flow(self, name: str) -> None:
        entry = self._writing.get(name)
        if entry is not None:
            entry.flowed = True

    async def ensure(self, record: Record, etag: str) -> tuple[Record, str]:
        """The record (and ETag) with this process holding its lease with
        ``Timing.margin`` left, written if it had to be taken or renewed.
        Called before every part upload and completion. ``OffsetMismatch``
        when another instance moved the upload; ``WriterBusy`` when another
        one holds it."""
        if not self.enabled:
            return record, etag
        holding = self._held.get(record.name)
        entry = self._writing.get(record.name)
        current = etag if entry is None else entry.alias.get(etag, etag)
        if holding is not None and holding.etag == current \
                and holding.deadline - self._monotonic() >= self.timing.margin:
            return record, etag
        now = self._clock()
        ours = holding is not None and leases.still_ours(holding.lease, record.lease)
        if not ours and leases.standing(record.lease, self.instance, now) is Standing.HELD:
            assert record.lease is not None
            raise WriterBusy(
                f"instance {record.lease.holder} is writing this upload; retry shortly",
                retry_after=max(1, math.ceil(record.lease.expires_at - now)),
            )
        return await self.put(record, etag, take=True)

    async def put(self, record: Record, etag: str, *, release: bool = False,
                  take: bool = False) -> tuple[Record, str]:
        """Write ``record`` over version ``etag``: with this process's lease
        renewed if it holds it (taken with ``take``, released with
        ``release``), or with the lease left as it is if it does not."""
        if not self.enabled:
            return record, await self._records.put(record, if_match=etag)
        entry = self._writing.get(record.name)
        if entry is None:
            return await self._put(record, etag, release, None, take=take)
        async with entry.lock:
            return await self._put(record, etag, release, entry, take=take)

    async def _put(self, record: Record, etag: str, release: bool,
                   entry: Writing | None, *, take: bool = False) -> tuple[Record, str]:
        name = record.name
        if entry is not None:
            if entry.fenced is not None:
                raise entry.fenced
            etag = entry.alias.get(etag, etag)
        holding = self._held.get(name)
        if holding is None and not take:
            # Not this process's lease to renew or release: a plain
            # conditional write (staging, settling a total, a notice).
            new_etag = await self._records.put(record, if_match=etag)
            if entry is not None:
                entry.base = (record, new_etag)
            return record, new_etag
        basis = holding.lease if holding is not None and holding.etag == etag else record.lease
        if holding is not None and holding.deadline <= self._monotonic():
            # By this process's own clock the lease ran out (it was paused,
            # or S3 was slow): another instance may hold the upload now, so
            # look before writing over it rather than after.
            head = await self._client.head(self._layout.record_key(name))
            if head is None:
                self._held.pop(name, None)
                raise UploadNotFound(f"the upload {name!r} was cancelled")
            if str(head.get("ETag")) != etag:
                basis, etag, _ = await self._merge(name, etag, entry)
        while True:
            sent = self._monotonic()
            lease = None if release else leases.granted(
                basis, record.generation, self.instance, self._clock(), self.timing)
            generation = max(record.generation, 0 if lease is None else lease.generation,
                             0 if basis is None else basis.generation)
            updated = replace(record, lease=lease, generation=generation)
            try:
                # Awaited to its end even if the caller is cancelled: a take
                # that landed unseen would hold the upload until it expired.
                new_etag = await settled(self._records.put(updated, if_match=etag))
            except OffsetMismatch:
                basis, etag, issued = await self._merge(
                    name, etag, entry, taking=record if holding is None else None)
                record = replace(record, generation=max(record.generation, issued))
                continue
            except UploadNotFound:
                self._held.pop(name, None)
                raise
            if lease is None:
                self._held.pop(name, None)
            else:
                if holding is None or holding.lease.generation != lease.generation:
                    log.debug("upload %r: lease generation %d taken", name, lease.generation)
                self._held[name] = Holding(lease, sent + self.timing.ttl, updated, new_etag)
                if entry is not None:
                    entry.flowed = False
                    self._start_watching(name, entry)
            return updated, new_etag

    def _start_watching(self, name: str, entry: Writing) -> None:
        if entry.watcher is None and not entry.stopped:
            entry.watcher = asyncio.create_task(self._watch(name, entry))

    async def _merge(self, name: str, etag: str, entry: Writing | None, *,
                     taking: Record | None = None) -> tuple[Lease | None, str, int]:
        """After a conditional write over ``etag`` failed: the record's lease
        and version now, if all that changed is another instance asking this
        holder to let go (the write is then told to stop), or, when
        ``taking`` the lease over that record, another instance releasing
        it; otherwise the upload moved on without this writer, which is
        fenced off."""
        loaded = await self._records.read(name)
        if loaded is None:
            self._held.pop(name, None)
            raise UploadNotFound(f"the upload {name!r} was cancelled")
        current, new_etag = loaded
        if taking is not None and current.same_data(taking) and leases.standing(
                current.lease, self.instance, self._clock()) is not Standing.HELD:
            return current.lease, new_etag, current.generation
        holding = self._held.get(name)
        if holding is not None and holding.etag == etag \
                and leases.still_ours(holding.lease, current.lease) \
                and current.same_data(holding.record):
            assert current.lease is not None
            if current.lease.takeover is not None and entry is not None \
                    and not entry.stopped:
                log.info("upload %r: instance %s asked for it; saving what arrived, "
                         "then letting go", name, current.lease.takeover)
                entry.request_stop()
            self._held[name] = replace(holding, lease=current.lease, record=current,
                                       etag=new_etag)
            if entry is not None:
                entry.alias = {old: new_etag for old in (*entry.alias, etag)}
            return current.lease, new_etag, current.generation
        self._held.pop(name, None)
        fenced = OffsetMismatch(
            f"another writer changed {name!r}; it holds {current.offset} bytes",
            offset=current.offset,
        )
        if entry is not None:
            log.warning("upload %r: another instance took it over (generation %s); this "
                        "request stops without writing", name,
                        None if current.lease is None else current.lease.generation)
            entry.fenced = fenced
            entry.request_stop()
        raise fenced

    # -- while the client sends -------------------------------------------------

    async def _watch(self, name: str, entry: Writing) -> None:
        """While a write of ``name`` runs in this process: take the lease if
        it is still going without one; while it holds the lease, renew it if
        data still flows, and look for another instance asking for it."""
        try:
            while not entry.stopped:
                await asyncio.sleep(self.timing.watch)
                async with entry.lock:
                    holding = self._held.get(name)
                    if holding is None:
                        if entry.base is None:
                            break  # no write and no lease: nothing to watch
                        await self._take_for_slow_write(name, entry, *entry.base)
                        continue
                    left = holding.deadline - self._monotonic()
                    if (entry.flowed or entry.busy) and left < self.timing.renew_below:
                        old = holding.etag
                        _, new_etag = await self._put(holding.record, old, False, entry)
                        entry.alias = {o: new_etag for o in (*entry.alias, old)}
                        continue
                    head = await self._client.head(self._layout.record_key(name))
                    if head is None or str(head.get("ETag")) == holding.etag:
                        continue
                    await self._merge(name, holding.etag, entry)
        except (OffsetMismatch, UploadNotFound, WriterBusy):
            pass  # fenced off or gone: the writer finds out at its next write
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Watching is an optimisation: the conditional writes stay the check.
            log.warning("upload %r: watching its lease failed: %r", name, exc)
        finally:
            entry.watcher = None

    async def _take_for_slow_write(self, name: str, entry: Writing, record: Record,
                                   etag: str) -> None:
        if leases.standing(record.lease, self.instance, self._clock()) is Standing.HELD:
            return  # another instance's: the writer finds out when it needs the lease
        _, new_etag = await self._put(record, etag, False, entry, take=True)
        entry.base = None
        entry.alias = {o: new_etag for o in (*entry.alias, etag)}

    async def _stop_watching(self, entry: Writing) -> None:
        watcher = entry.watcher
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def release_quietly(self, name: str) -> None:
        """Release a lease a request still held when it ended (it failed, or
        filled the upload without finishing it, or was cancelled)."""
        entry = self._writing.get(name)
        if entry is None:
            await self._release(name)
            return
        async with entry.lock:  # not while the watcher renews it
            await self._release(name)

    async def _release(self, name: str) -> None:
        holding = self._held.get(name)
        if holding is None:
            return
        try:
            await self._put(holding.record, holding.etag, True, None)
        except (UploadError, S3Refusal) as exc:
            log.info("upload %r: its lease is left to expire: %r", name, exc)
        finally:
            self._held.pop(name, None)


def instance_id() -> str:
    """This process's name in leases and logs: unique per start, readable."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def check_conditional_writes(client: S3Client, layout: Layout) -> None:
    """Refuse to start on a bucket that ignores ``If-None-Match``: leases and
    session records rely on conditional writes, and without them two
    instances could both think they won (see docs/scaling.md)."""
    key = f"{layout.reserved}probes/conditional-{uuid.uuid4().hex}"
    try:
        await client.call("PutObject", Key=key, Body=b"1", IfNoneMatch="*")
        try:
            await client.call("PutObject", CONFLICT_CODES, Key=key, Body=b"2", IfNoneMatch="*")
        except S3Refusal:
            return
        raise StorageMisconfigured(
            f"the bucket {client.bucket!r} does not enforce conditional writes "
            "(a second PutObject with If-None-Match: * succeeded); several instances "
            "cannot share it safely. Use a store that supports them, or set "
            "storage.s3.conditional_writes: false and run one instance (or sticky sessions)"
        )
    finally:
        try:
            await client.call("DeleteObject", Key=key)
        except (UploadError, S3Refusal):
            log.debug("could not delete the probe object %s", key)
