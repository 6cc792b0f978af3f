"""The cleanup job: abort uploads nobody finished, sweep orphans, retry callbacks.

Run from cron (``scripts/abort_stale_uploads.py`` or ``python -m app cleanup``)::

    python -m app cleanup --config /etc/upload-proxy/app.yaml --older-than 24h [--dry-run] [--json]

An unfinished upload whose last activity (``updated_at``: its last durable
write, not its creation) is older than ``--older-than`` is aborted with
``Store.cancel``, which removes the multipart upload, the staged data and the
session record together. Each candidate is read again right before it is
aborted, so an upload a client resumed while the job ran is left alone.
Completed objects are never touched; only the session records of uploads
completed before the threshold are dropped (they serve repeat requests to a
finished upload, and would otherwise pile up one per object). The job only goes
through the store, which never strays outside its root or prefix, and sweeps
only what is provably its own: on S3, a multipart upload counts only if the
store wrote its marker before creating it, so other applications' uploads in
the bucket survive, with prefix ``""`` too.

Pick ``--older-than`` far above the time the slowest client needs between two
durable writes (a part: 6 MiB by default; a slow phone at 20 KiB/s needs five
minutes): an upload in the middle of a request looks idle until its next part
lands. It should normally be at or above ``storage.upload_ttl``, past which the
server already answers 404 for the upload.

Stores that can find leftovers of crashes (a multipart upload without a session
record, staged data or a record without a multipart upload) implement
``OrphanSweeper``; the job uses it when the store has it.

Exit status: 0 when everything went through, 1 when any abort, sweep, listing
or callback redelivery failed, 2 for bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import aiohttp

from app.callbacks.intents import notifier_for
from app.config import Config, ConfigError, load_config, parse_duration
from app.errors import UploadError, UploadNotFound
from app.ops.logs import setup_logging
from app.stores.base import (
    CallbackOutbox,
    NotAnOrphan,
    Orphan,
    OrphanSweeper,
    Store,
    UploadInfo,
)
from app.stores.registry import open_store

log = logging.getLogger("app.cleanup")

#: Aborts (or orphan removals) in flight at once: enough to get through a big
#: backlog in minutes, few enough not to crowd the storage the server also uses.
DEFAULT_CONCURRENCY = 8

@dataclass(frozen=True)
class CleanupAction:
    """One line of the job's output."""

    #: aborted, would abort, skipped, removed orphan, would remove orphan, error,
    #: callbacks.
    verb: str
    target: str
    idle: float | None = None
    size: int | None = None
    detail: str = ""

    def line(self) -> str:
        parts = [self.verb, self.target]
        if self.idle is not None:
            parts.append(f"idle {format_idle(self.idle)}")
        if self.size is not None:
            parts.append(f"{self.size} bytes")
        text = " ".join(parts)
        return f"{text}: {self.detail}" if self.detail else text


@dataclass
class CleanupReport:
    scanned: int = 0
    aborted: int = 0
    orphans: int = 0
    skipped_active: int = 0
    #: Session records of long-completed uploads dropped (their objects stay).
    forgotten: int = 0
    errors: int = 0
    bytes_freed: int = 0
    callbacks_delivered: int = 0
    callbacks_pending: int = 0
    #: In a dry run the counts say what would have been done.
    dry_run: bool = False

    def summary(self) -> dict[str, int | bool]:
        return asdict(self)

    def summary_line(self) -> str:
        fields = " ".join(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in self.summary().items()
        )
        return f"summary {fields}"

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


class _Notifier(Protocol):
    """What the job needs of ``app.callbacks.CompletionNotifier``."""

    async def redeliver_pending(self) -> tuple[int, int]: ...


def format_idle(seconds: float) -> str:
    """``3d2h``, ``5h12m``, ``42m``, ``30s``: the two largest units that matter."""
    remaining = max(int(seconds), 0)
    values = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        value, remaining = divmod(remaining, size)
        values.append((value, unit))
    first = next((i for i, (value, _) in enumerate(values) if value), len(values) - 1)
    return "".join(f"{value}{unit}" for value, unit in values[first:first + 2] if value) or "0s"


async def run_cleanup(
    store: Store,
    *,
    older_than: float,
    now: float,
    dry_run: bool = False,
    notifier: _Notifier | None = None,
    on_action: Callable[[CleanupAction], None] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> CleanupReport:
    """Abort unfinished uploads idle for more than ``older_than`` seconds at
    ``now`` (a parameter so tests can move time), forget session records of
    uploads completed before then, sweep orphans when the store is an
    ``OrphanSweeper``, then retry pending completion callbacks."""
    if older_than <= 0:
        raise ValueError("older_than must be positive")
    job = _Cleanup(store, older_than, now, dry_run, on_action, concurrency)
    await job.abort_stale()
    await job.guarded("completed session records", job.forget_completed())
    if isinstance(store, OrphanSweeper):
        await job.guarded("finding orphans", job.sweep(store))
    if notifier is not None:
        await job.guarded("pending callbacks", job.redeliver(notifier))
    return job.report


class _Cleanup:
    def __init__(
        self,
        store: Store,
        older_than: float,
        now: float,
        dry_run: bool,
        on_action: Callable[[CleanupAction], None] | None,
        concurrency: int,
    ) -> None:
        self.store = store
        self.older_than = older_than
        self.now = now
        self.cutoff = now - older_than
        self.dry_run = dry_run
        self.report = CleanupReport(dry_run=dry_run)
        self._on_action = on_action
        # Taken before a task is created, so a listing of millions never
        # queues more than this many tasks.
        self._slots = asyncio.Semaphore(max(concurrency, 1))

    def emit(self, action: CleanupAction) -> None:
        if self._on_action is not None:
            self._on_action(action)

    async def guarded(self, target: str, work: Awaitable[None]) -> None:
        # One failure must not stop the others: count it, say it, go on.
        try:
            await work
        except Exception as exc:
            self.report.errors += 1
            self.emit(CleanupAction("error", target, detail=_reason(exc)))
            if not isinstance(exc, UploadError):
                log.exception("cleanup of %s failed unexpectedly", target)

    async def _in_slot(self, target: str, work: Awaitable[None]) -> None:
        try:
            await self.guarded(target, work)
        finally:
            self._slots.release()

    async def abort_stale(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            try:
                async for info in self.store.list_unfinished():
                    self.report.scanned += 1
                    # A record carrying the intent to notify is a completion
                    # that was interrupted: the callbacks step finishes it.
                    if info.is_complete or info.notify_pending or info.updated_at > self.cutoff:
                        continue
                    await self._slots.acquire()
                    tasks.create_task(self._in_slot(info.name, self._abort(info)))
            except Exception as exc:
                # Whatever was listed before still gets handled by the tasks.
                self.report.errors += 1
                self.emit(CleanupAction("error", "listing unfinished uploads",
                                        detail=_reason(exc)))

    async def _abort(self, info: UploadInfo) -> None:
        report = self.report
        idle = self.now - info.updated_at
        try:
            current = await self.store.get(info.name)
        except UploadNotFound:
            report.skipped_active += 1
            self.emit(CleanupAction("skipped", info.name, detail="gone since it was listed"))
            return
        if (
            current.is_complete
            or current.session_id != info.session_id
            or current.offset != info.offset
            or current.updated_at != info.updated_at
            or current.updated_at > self.cutoff
        ):
            # Resumed, replaced or finished while the job ran.
            report.skipped_active += 1
            self.emit(CleanupAction("skipped", info.name,
                                    detail="active again since it was listed"))
            return
        if not self.dry_run:
            try:
                # Only this session: a new upload of the name since the re-check stays.
                await self.store.cancel(info.name, session_id=info.session_id)
            except UploadNotFound:
                report.skipped_active += 1
                self.emit(CleanupAction("skipped", info.name,
                                        detail="gone before it was aborted"))
                return
        report.aborted += 1
        report.bytes_freed += current.offset
        verb = "would abort" if self.dry_run else "aborted"
        self.emit(CleanupAction(verb, info.name, idle, current.offset))

    async def forget_completed(self) -> None:
        """Drop the session records of uploads completed before the cutoff.

        They only serve repeat requests to a finished upload (answered 200 with
        its JSON); kept forever they would pile up, one per object. The objects
        themselves are never touched."""
        async with asyncio.TaskGroup() as tasks:
            async for info in self.store.list_completed():
                done = info.completed
                if done is None or done.completed_at > self.cutoff:
                    continue
                if info.notify_pending:
                    # Its record is the only trace of the callback still owed.
                    continue
                await self._slots.acquire()
                tasks.create_task(self._in_slot(info.name, self._forget(info)))

    async def _forget(self, info: UploadInfo) -> None:
        if not self.dry_run:
            try:
                await self.store.cancel(info.name, session_id=info.session_id)
            except UploadNotFound:
                return  # replaced or already gone: nothing of it to forget
        self.report.forgotten += 1
        self.emit(CleanupAction("would forget" if self.dry_run else "forgot",
                                f"completed record of {info.name}"))

    async def sweep(self, sweeper: OrphanSweeper) -> None:
        orphans = await sweeper.find_orphans(self.older_than, self.now)
        async with asyncio.TaskGroup() as tasks:
            for orphan in orphans:
                await self._slots.acquire()
                tasks.create_task(self._in_slot(f"orphan {orphan.key}",
                                                self._remove(sweeper, orphan)))

    async def _remove(self, sweeper: OrphanSweeper, orphan: Orphan) -> None:
        target = f"orphan {orphan.kind} {orphan.key}"
        idle = self.now - orphan.last_modified if orphan.last_modified else None
        freed = orphan.size
        if not self.dry_run:
            try:
                freed = await sweeper.remove_orphan(orphan)
            except NotAnOrphan as exc:
                self.report.skipped_active += 1
                self.emit(CleanupAction("skipped", target, detail=str(exc) or "in use after all"))
                return
        self.report.orphans += 1
        self.report.bytes_freed += freed
        self.emit(CleanupAction("would remove" if self.dry_run else "removed", target, idle,
                                freed))

    async def redeliver(self, notifier: _Notifier) -> None:
        report = self.report
        if self.dry_run:
            # Listing is harmless; sending is an action a dry run must not take.
            store = self.store
            pending = await store.list_pending() if isinstance(store, CallbackOutbox) else []
            report.callbacks_pending = len(pending)
            if pending:
                self.emit(CleanupAction("would redeliver", f"{len(pending)} pending callbacks"))
            return
        report.callbacks_delivered, report.callbacks_pending = await notifier.redeliver_pending()
        if report.callbacks_delivered or report.callbacks_pending:
            self.emit(CleanupAction(
                "callbacks", f"{report.callbacks_delivered} redelivered, "
                f"{report.callbacks_pending} still pending"))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UploadError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


# -- command line -------------------------------------------------------------


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be longer than 0")
    return seconds


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Abort unfinished uploads idle longer than --older-than, remove "
        "orphaned storage, retry pending completion callbacks. Exit 0: done; 1: some "
        "action failed; 2: bad arguments or configuration.",
    )
    parser.add_argument("--config", default=None,
                        help="YAML config file (default: config/app.yaml)")
    parser.add_argument("--older-than", required=True, type=_duration, metavar="DURATION",
                        help="idle time since the last write, e.g. 24h, 90m, 7d")
    parser.add_argument("--dry-run", action="store_true",
                        help="report what would be done without changing anything")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on stdout "
                        "(action lines then go to stderr)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"aborts in flight at once (default {DEFAULT_CONCURRENCY})")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.concurrency < 1:
        print("error: --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging)
    # Cron mails whatever is printed: the store's routine INFO lines are noise.
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))
    try:
        return asyncio.run(_main(args, config))
    except KeyboardInterrupt:
        return 1


async def _main(args: argparse.Namespace, config: Config) -> int:
    lines = sys.stderr if args.json else sys.stdout

    def show(action: CleanupAction) -> None:
        print(action.line(), file=lines, flush=True)

    try:
        store = await open_store(config.storage, serving=False)
    except UploadError as exc:
        print(f"error: cannot open the store: {exc.message}", file=sys.stderr)
        return 1
    try:
        async with aiohttp.ClientSession() as session:
            notifier = None
            if config.callbacks.on_complete_url:
                notifier = notifier_for(config.callbacks, store, session)
            report = await run_cleanup(
                store, older_than=args.older_than, now=time.time(), dry_run=args.dry_run,
                notifier=notifier, on_action=show, concurrency=args.concurrency,
            )
    finally:
        await store.close()
    if args.json:
        print(json.dumps(report.summary()), flush=True)
    else:
        print(report.summary_line(), flush=True)
    return report.exit_code
