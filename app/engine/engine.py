"""The upload engine: offsets, overlap skipping, limits, digests, completion.

It speaks in names, byte ranges and bodies; it knows nothing of HTTP or of S3.
The HTTP layer parses requests into calls here, and a ``Store`` keeps bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

from app.config import StorageConfig
from app.core import rules
from app.core.budget import MemoryBudget
from app.core.grant import Grant
from app.core.protocol import Chunk
from app.engine.bodies import Body, BodyCheck, Flow, chunks_of, empty, replay, verified
from app.engine.completion import Completion
from app.engine.model import (
    ClientDigests,
    CompletionHook,
    Md5Source,
    NoticeHook,
    Outcome,
)
from app.engine.writers import Lease, WriterRegistry
from app.errors import (
    Forbidden,
    LengthMismatch,
    StorageUnavailable,
    TooLarge,
    UploadNotFound,
)
from app.stores.base import (
    CompletedObject,
    Concatenation,
    ObjectOwners,
    SharedWriting,
    Store,
    UploadInfo,
)

log = logging.getLogger(__name__)

DEFAULT_CONTENT_TYPE = "application/octet-stream"


class UploadEngine:
    def __init__(
        self,
        store: Store,
        config: StorageConfig,
        writers: WriterRegistry,
        *,
        on_start: Callable[[UploadInfo], None] | None = None,
        on_complete: CompletionHook | None = None,
        on_notice_pending: NoticeHook | None = None,
        clock: Callable[[], float] = time.time,
        budget: MemoryBudget | None = None,
    ) -> None:
        """With ``on_notice_pending``, uploads are finished with ``notify``: the
        store records the intent to notify with the completion. ``budget``:
        the app's memory budget, which bodies held for their checksum are
        taken from (without one the engine gets its own, as configured)."""
        self._store = store
        self._budget = budget if budget is not None else MemoryBudget(
            config.memory_budget, wait=config.budget_wait)
        self._config = config
        self._writers = writers
        self._on_start = on_start
        self._on_complete = on_complete
        self._on_notice_pending = on_notice_pending
        self._clock = clock
        self._completion = Completion(store, on_complete, notify=on_notice_pending is not None)

    # -- requests ---------------------------------------------------------

    async def status(
        self, name: str, total: int | None, grant: Grant, digests: ClientDigests | None = None,
        *, known: UploadInfo | None = None,
    ) -> Outcome:
        """A ``bytes */T`` probe; finalizes when ``T`` bytes are all present.
        ``known``: the upload as ``lookup`` read it for this very request, so
        a probe of an id session reads the store once."""
        # A probe never takes an upload from another instance; the lease is
        # taken only if it turns out to complete the upload.
        if self._writers.is_held(name):
            known = None  # a request of this process is writing: it saves first
        async with self._exclusive(name, grant, writes=False):
            if known is not None and known.name == name:
                info = known
                rules.check_live(info, ttl=self._config.upload_ttl, now=self._clock(),
                                 owner=grant.owner)
            else:
                info = await self._current(name, grant)
            rules.check_stated_total(info, total)
            if info.is_complete:
                self._check_completed(info, digests)
                await self._notice_pending(info, replacing=False)
                return Outcome(info)
            if total is None or info.offset != total:
                return Outcome(info)
            if info.total is None:
                rules.check_total_fits(info, total)
                info = await self._store.write(info, empty(), total=total)
            return Outcome(await self._completion.finish(info, None, digests))

    async def put_chunk(
        self,
        name: str,
        chunk: Chunk,
        body: Body,
        *,
        content_length: int | None,
        content_type: str | None,
        grant: Grant,
        digests: ClientDigests | None = None,
        mode: rules.Mode = rules.Mode.SKIP_OVERLAP,
        check: BodyCheck | None = None,
        creates: bool = True,
        md5_source: Md5Source | None = None,
    ) -> Outcome:
        """Bytes ``chunk.start..chunk.end`` of the object (a ``Content-Range`` request).
        With ``check``, the body is held until its digest matched, and a body
        that fails it, or stops early, stores nothing. ``creates``: a chunk at
        byte 0 of an unknown upload starts it (False for sessions that must be
        initiated first, such as those addressed by an upload id)."""
        rules.check_length(content_length, chunk.length)
        limits = self._limits(grant)
        # The range's end bounds the object's size from below, so an open-ended
        # range can be refused before anything is created.
        rules.check_declared_size(
            chunk.total if chunk.total is not None else chunk.end + 1, limits
        )
        request = rules.AppendRequest(start=chunk.start, length=chunk.length, total=chunk.total)
        async with self._exclusive(name, grant) as lease:
            try:
                info = await self._current(name, grant)
            except UploadNotFound:
                if chunk.start != 0 or not creates:
                    raise
                await self._check_object_owner(name, grant)
                info = await self._create(name, chunk.total, content_type, {}, grant)
            if info.is_complete:
                rules.check_stated_total(info, chunk.total)
                self._check_completed(info, digests)
                await self._notice_pending(info, replacing=False)
                return Outcome(info)
            plan = rules.plan_append(info, request, mode, limits)
            return await self._stream(
                info, body, lease, plan, digests=digests, check=check, md5_source=md5_source
            )

    async def put_stream(
        self,
        name: str,
        start: int,
        body: Body,
        *,
        total: int | None,
        grant: Grant,
        digests: ClientDigests | None = None,
        md5_source: Md5Source | None = None,
    ) -> Outcome:
        """Bytes from ``start`` until the body ends, its length unknown up front
        (Google's ``bytes a-*/T`` and ``bytes a-*/*``). Bytes already stored
        are skipped. With ``total`` unknown, a body that ends cleanly ends the
        object there; a body that stops early keeps what arrived and leaves
        the total open. The session must exist (it is never created here)."""
        return await self.append(
            name, start, body, length=None, total=total, grant=grant,
            finish_at_eof=total is None, digests=digests, mode=rules.Mode.SKIP_OVERLAP,
            md5_source=md5_source,
        )

    async def append(
        self,
        name: str,
        start: int,
        body: Body,
        *,
        length: int | None,
        total: int | None,
        grant: Grant,
        finish_at_eof: bool = False,
        digests: ClientDigests | None = None,
        mode: rules.Mode = rules.Mode.EXACT_OFFSET,
        check: BodyCheck | None = None,
        md5_source: Md5Source | None = None,
    ) -> Outcome:
        """Bytes from ``start`` of an existing session, ``length`` of them or,
        when None (no Content-Length, as a tus ``PATCH`` sent with chunked
        transfer-encoding), until the body ends; the body may be empty.
        ``total`` settles a deferred length. ``finish_at_eof``: a body that
        ends cleanly is the object's end (the IETF draft's ``Upload-Complete:
        ?1``), so its total is settled and the upload finished. An append to a
        completed upload changes nothing."""
        limits = self._limits(grant)
        rules.check_declared_size(total, limits)
        request = rules.AppendRequest(start=start, length=length, total=total)
        async with self._exclusive(name, grant) as lease:
            info = await self._current(name, grant)
            if info.is_complete:
                rules.check_append_to_complete(info, request, mode)
                self._check_completed(info, digests)
                await self._notice_pending(info, replacing=False)
                return Outcome(info)
            plan = rules.plan_append(info, request, mode, limits)
            return await self._stream(
                info, body, lease, plan, digests=digests, check=check,
                settle_total_at_eof=finish_at_eof, md5_source=md5_source,
            )

    async def concatenate(
        self, name: str, sources: Sequence[CompletedObject], joiner: Concatenation, grant: Grant
    ) -> Outcome:
        """Fill the new session ``name`` with finished objects, joined by the
        store itself (``Concatenation``), and finish it."""
        async with self._exclusive(name, grant):
            info = await self._current(name, grant)
            if info.is_complete:
                await self._notice_pending(info, replacing=False)
                return Outcome(info)
            done = await joiner.join(info, sources, notify=self._on_notice_pending is not None)
        log.info("upload %r complete: %d bytes joined in the store from %d objects",
                 done.object_name, done.offset, len(sources))
        if self._on_complete is not None:
            await self._on_complete(done)
        return Outcome(done)

    async def lookup(self, name: str) -> UploadInfo:
        """The live upload ``name``, before any grant is known: how a dialect
        that addresses sessions by id learns which object a request is about,
        to ask the auth webhook about that object. Owner binding is left to
        the request that follows with its grant."""
        info = await self._store.get(name)
        rules.check_live(info, ttl=self._config.upload_ttl, now=self._clock(), owner=None)
        return info

    def expires_at(self, info: UploadInfo) -> float | None:
        """When an unfinished upload expires if it stays idle (None: never)."""
        return None if info.is_complete else info.updated_at + self._config.upload_ttl

    async def put_whole(
        self,
        name: str,
        body: Body,
        *,
        content_length: int | None,
        content_type: str | None,
        grant: Grant,
        digests: ClientDigests | None = None,
    ) -> Outcome:
        """A plain ``PUT`` without ``Content-Range``: a new upload of the whole object."""
        limits = self._limits(grant)
        rules.check_declared_size(content_length, limits)
        async with self._exclusive(name, grant) as lease:
            await self._check_replaceable(name, grant, name)
            info = await self._create(name, content_length, content_type, {}, grant)
            plan = rules.WritePlan(
                skip=0, length=content_length, settle_total=None,
                limit=rules.upload_limit(info, content_length, limits),
            )
            return await self._stream(
                info, body, lease, plan, digests=digests,
                settle_total_at_eof=content_length is None,
            )

    async def initiate(
        self,
        name: str,
        *,
        total: int | None,
        content_type: str | None,
        metadata: Mapping[str, str],
        grant: Grant,
        target: str | None = None,
    ) -> UploadInfo:
        """``POST``: start (or restart) a session without data. With ``target``
        the session has a name of its own (an id session) and its object goes
        to ``target``."""
        rules.check_declared_size(total, self._limits(grant))
        async with self._exclusive(name, grant):
            await self._check_replaceable(name, grant, name if target is None else target)
            return await self._create(name, total, content_type, metadata, grant, target)

    async def cancel(self, name: str, grant: Grant) -> None:
        async with self._exclusive(name, grant):
            info = await self._current(name, grant)
            await self._notice_pending(info, replacing=True)
            # Only the session that was checked: another process may have
            # replaced it since, and that newer upload is not ours to cancel.
            await self._store.cancel(name, session_id=info.session_id)
            log.info("upload %r cancelled", info.object_name)

    # -- internals --------------------------------------------------------

    @asynccontextmanager
    async def _exclusive(
        self, name: str, grant: Grant, *, writes: bool = True
    ) -> AsyncIterator[Lease]:
        """Become the one request working on ``name``. Taking over asks a
        running writer to stop, so a request that the upload's owner would
        refuse is refused first: another user's probes cost it nothing. With
        ``writes``, a store shared by instances (``SharedWriting``) also has
        any other instance writing ``name`` let go first."""
        holder = self._writers.holder(name)
        if holder is not None and grant.owner is not None:
            if holder.owner is not None and holder.owner != grant.owner:
                raise Forbidden("this upload belongs to another owner")
            if holder.owner is None:
                await self._check_owner_of_stored(name, grant)
        async with self._writers.hold(name, grant.owner) as lease:
            if writes and isinstance(self._store, SharedWriting):
                async with self._store.writing(name, lease.request_stop):
                    yield lease
            else:
                yield lease

    async def _check_owner_of_stored(self, name: str, grant: Grant) -> None:
        try:
            info = await self._store.get(name)
        except UploadNotFound:
            return
        rules.check_live(info, ttl=self._config.upload_ttl, now=self._clock(), owner=grant.owner)

    async def _current(self, name: str, grant: Grant) -> UploadInfo:
        """The live upload, or ``UploadNotFound`` (expired counts as gone)."""
        info = await self._store.get(name)
        rules.check_live(info, ttl=self._config.upload_ttl, now=self._clock(), owner=grant.owner)
        return info

    @staticmethod
    def _check_completed(info: UploadInfo, digests: ClientDigests | None) -> None:
        if digests is not None:
            rules.check_completed_digests(info, digests.crc32c, digests.md5)

    def _limits(self, grant: Grant) -> rules.Limits:
        return rules.Limits(configured=self._config.max_upload_size, granted=grant.max_size)

    async def _check_replaceable(self, name: str, grant: Grant, object_name: str) -> None:
        """A new upload may replace an old one only if the owners agree: the
        session's, and the finished object's (kept with the object, so it
        holds after the session record is forgotten or cancelled)."""
        try:
            info = await self._store.get(name)
            owner = rules.replacing_owner(info, grant.owner, allow_replace=grant.allow_replace)
            rules.check_live(info, ttl=self._config.upload_ttl, now=self._clock(), owner=owner)
        except UploadNotFound:
            await self._check_object_owner(object_name, grant)
            return
        await self._check_object_owner(object_name, grant)
        await self._notice_pending(info, replacing=True)

    async def _check_object_owner(self, object_name: str, grant: Grant) -> None:
        if grant.owner is None or grant.allow_replace or not isinstance(self._store, ObjectOwners):
            return  # nothing to compare (one call saved)
        owner = await self._store.owner_of(object_name)
        rules.check_replace(owner, grant.owner, allow_replace=grant.allow_replace)

    async def _notice_pending(self, info: UploadInfo, *, replacing: bool) -> None:
        if info.notify_pending and info.is_complete and self._on_notice_pending is not None:
            await self._on_notice_pending(info, replacing)

    async def _create(
        self,
        name: str,
        total: int | None,
        content_type: str | None,
        metadata: Mapping[str, str],
        grant: Grant,
        target: str | None = None,
    ) -> UploadInfo:
        info = await self._store.create(
            name,
            total=total,
            content_type=content_type or DEFAULT_CONTENT_TYPE,
            metadata={**metadata, **grant.metadata},
            owner=grant.owner,
            target=target,
        )
        log.info("upload %r started (total %s, part size %d)", info.object_name,
                 "unknown" if total is None else total, info.part_size)
        if self._on_start is not None:
            self._on_start(info)
        return info

    def _held_size(self, check: BodyCheck | None, length: int | None) -> int:
        """Memory a body with a per-request checksum is held in until verified,
        taken before any of it is read: a reservation that grew chunk by chunk
        would wait while holding, and such waits can block one another."""
        if check is None:
            return 0
        limit = self._config.checksum_buffer
        return limit if length is None else min(length, limit)

    async def _stream(
        self,
        info: UploadInfo,
        body: Body,
        lease: Lease,
        plan: rules.WritePlan,
        *,
        digests: ClientDigests | None,
        settle_total_at_eof: bool = False,
        check: BodyCheck | None = None,
        md5_source: Md5Source | None = None,
    ) -> Outcome:
        """Feed ``body`` to the store as ``plan`` says."""
        skip, length, limit = plan.skip, plan.length, plan.limit
        lease.on_stop(body.abort)
        # MD5 state cannot be saved, so it is only worth computing from byte 0.
        wants_md5 = self._config.md5 or (digests is not None and digests.md5 is not None)
        md5 = md5_source(info.offset) if md5_source is not None else None
        if md5 is None and wants_md5 and info.offset == 0:
            md5 = hashlib.md5()
        flow = Flow(md5=md5)
        start = info.offset
        # A request asked to stop while it waits for memory (a takeover,
        # shutdown) ends its wait at once, keeping what it read.
        async with asyncio.timeout(None) as deadline, self._budget.stoppable(
            lease.on_stop
        ), self._budget.reserved(
            self._held_size(check, length), leave=self._config.part_size
        ) as memory:
            chunks = chunks_of(
                body, flow, deadline, skip=skip, length=length, room=limit - info.offset,
                persist_timeout=self._config.persist_timeout,
            )
            if check is not None:
                held = await verified(chunks, check, flow, length, self._config.checksum_buffer)
                if held is None:
                    log.info("upload %r: a checked body stopped early; nothing of it stored",
                             info.object_name)
                    return Outcome(info, interrupted=flow.interrupted)
                chunks = replay(held, memory.give_back)
            try:
                info = await self._store.write(info, chunks, total=plan.settle_total,
                                               expected_length=plan.length)
            except TimeoutError:
                raise StorageUnavailable(
                    "storage did not save the received data in time; probe for the offset"
                ) from None
        stored = info.offset - start
        if flow.overflow:
            if length is None:
                raise TooLarge(
                    f"the upload exceeds the maximum size of {limit} bytes; "
                    f"{info.offset} bytes were kept"
                )
            raise LengthMismatch(
                f"the body is longer than the range it declares; the {stored} bytes "
                "in range were kept"
            )
        if flow.interrupted:
            log.info("upload %r: body interrupted after %d new bytes; offset now %d",
                     info.object_name, stored, info.offset)
            return Outcome(info, interrupted=True, stored=stored)
        if length is not None and flow.seen < skip + length:
            # The body ended (cleanly) before its declared range: keep what came,
            # and settle no total on a body that did not reach its own end.
            return Outcome(info, stored=stored)
        if settle_total_at_eof and info.total is None:
            info = await self._store.write(info, empty(), total=info.offset)
        if rules.ready_to_finish(info):
            followed = start == 0 or md5_source is not None
            digest = flow.md5.digest() if flow.md5 is not None and followed else None
            info = await self._completion.finish(info, digest, digests)
        return Outcome(info, stored=stored)
