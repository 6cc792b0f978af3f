"""The cleanup job (``app.cleanup``, ``scripts/abort_stale_uploads.py``) against
every store: the S3 store on the real moto server, and the filesystem store.

Time is moved by passing ``now`` to ``run_cleanup``: uploads created before a
mark count as idle for an hour, those touched after it do not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from app.callbacks.notifier import CompletionNotifier
from app.config import config_from_mapping, load_config
from app.errors import StorageUnavailable, UploadNotFound
from app.ops.cleanup import (
    CleanupAction,
    CleanupReport,
    format_idle,
    run_cleanup,
)
from app.stores.base import NotAnOrphan, Orphan, OrphanSweeper, Store, UploadInfo
from app.stores.registry import open_store
from tests.relay import TcpRelay
from tests.stores.fixtures import StoreHarness
from tests.stores.test_s3_store import emulate_s3_upload_listing, mark_upload

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "abort_stale_uploads.py"
HOUR = 3600.0
#: More than one page of S3 listings (1,000 keys).
S3_STALE = 1205
#: The filesystem store has no paging; a smaller crowd covers the same logic.
FS_STALE = 150
BATCH = 50


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def create(store: Store, name: str, data: bytes = b"") -> UploadInfo:
    info = await store.create(
        name, total=None, content_type="application/octet-stream", metadata={}, owner=None
    )
    if data:
        info = await store.write(info, chunks(data))
    return info


async def complete(store: Store, name: str, data: bytes) -> UploadInfo:
    info = await store.create(
        name, total=len(data), content_type="text/plain", metadata={}, owner=None
    )
    info = await store.write(info, chunks(data))
    return await store.finish(info)


async def create_many(store: Store, names: list[str], sizes: dict[str, int]) -> None:
    for start in range(0, len(names), BATCH):
        await asyncio.gather(*(
            create(store, name, b"s" * sizes.get(name, 0)) for name in names[start:start + BATCH]
        ))


async def unfinished_names(store: Store) -> set[str]:
    return {info.name async for info in store.list_unfinished()}


def read_object(harness: StoreHarness, s3_client: Any, name: str) -> bytes:
    storage = harness.storage
    if harness.kind == "filesystem":
        return (Path(storage.filesystem.root) / name).read_bytes()
    key = storage.s3.prefix + name
    return s3_client.get_object(Bucket=storage.s3.bucket, Key=key)["Body"].read()


def put_bystander(harness: StoreHarness, s3_client: Any, key: str, data: bytes) -> None:
    """Something the job must never touch, written straight to the backend."""
    storage = harness.storage
    if harness.kind == "filesystem":
        path = Path(storage.filesystem.root) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        s3_client.put_object(Bucket=storage.s3.bucket, Key=key, Body=data)


def read_bystander(harness: StoreHarness, s3_client: Any, key: str) -> bytes:
    storage = harness.storage
    if harness.kind == "filesystem":
        return (Path(storage.filesystem.root) / key).read_bytes()
    return s3_client.get_object(Bucket=storage.s3.bucket, Key=key)["Body"].read()


def s3_leftovers(harness: StoreHarness, s3_client: Any) -> tuple[list[str], list[str]]:
    """Multipart uploads and reserved-prefix keys still in the bucket (paged)."""
    bucket, prefix = harness.storage.s3.bucket, harness.storage.s3.prefix
    mpus = [
        upload["Key"]
        for page in s3_client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
        for upload in page.get("Uploads", [])
    ]
    keys = [
        item["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}.uploads/")
        for item in page.get("Contents", [])
    ]
    return mpus, keys


@pytest.fixture
def s3_client_or_none(store_kind: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("s3_client") if store_kind == "s3" else None


async def test_cleanup_aborts_stale_uploads_and_nothing_else(
    store_harness: StoreHarness, s3_client_or_none: Any
) -> None:
    s3 = s3_client_or_none
    store = await store_harness.open()
    count = S3_STALE if store_harness.kind == "s3" else FS_STALE
    names = [f"stale/{i:05d}.bin" for i in range(count)]
    # A few carry data (staged bytes to remove); most are empty sessions.
    sizes = {name: 1000 + i for i, name in enumerate(names) if i % 100 == 7}

    done = {f"done/{i}.txt": f"finished object {i}".encode() for i in range(3)}
    for name, data in done.items():
        await complete(store, name, data)
    bystanders = {"unrelated.bin": b"in the prefix, not an upload"}
    if store_harness.kind == "s3":
        bystanders["elsewhere/outside-prefix.bin"] = b"outside the prefix"
    for key, data in bystanders.items():
        put_bystander(store_harness, s3, key, data)

    started = time.perf_counter()
    await create_many(store, names, sizes)
    created_in = time.perf_counter() - started
    mark = time.time()
    await asyncio.sleep(0.05)
    active = await create(store, "active/keep.bin", b"still being written")
    # Completed after the cutoff: its record is kept for repeat requests.
    recent = "done/recent.txt"
    await complete(store, recent, b"just finished")
    assert active.updated_at > mark

    actions: list[CleanupAction] = []
    started = time.perf_counter()
    report = await run_cleanup(
        store, older_than=HOUR, now=mark + HOUR, on_action=actions.append
    )
    took = time.perf_counter() - started
    print(f"\n[{store_harness.kind}] created {count} uploads in {created_in:.1f}s; "
          f"cleanup took {took:.1f}s\n{report.summary_line()}")
    assert report == CleanupReport(
        scanned=count + 1, aborted=count, forgotten=len(done), bytes_freed=sum(sizes.values())
    )
    assert sorted(a.target for a in actions if a.verb == "aborted") == names
    line = next(a.line() for a in actions if a.target == names[7])
    assert line == f"aborted {names[7]} idle 1h {sizes[names[7]]} bytes"

    # Only the active upload is left, intact and still writable.
    assert await unfinished_names(store) == {"active/keep.bin"}
    current = await store.get("active/keep.bin")
    assert current.offset == len(b"still being written")
    await store.write(current, chunks(b"!"))
    # Finished objects and whatever else lives there are untouched; only the
    # session records of the long-completed uploads are gone.
    for name, data in done.items():
        with pytest.raises(UploadNotFound):
            await store.get(name)
        assert read_object(store_harness, s3, name) == data
    assert (await store.get(recent)).is_complete
    for key, data in bystanders.items():
        assert read_bystander(store_harness, s3, key) == data
    if store_harness.kind == "s3":
        mpus, keys = s3_leftovers(store_harness, s3)
        prefix = store_harness.storage.s3.prefix
        assert mpus == [f"{prefix}active/keep.bin"]
        assert not [k for k in keys if k.startswith(f"{prefix}.uploads/staged/")
                    and active.session_id not in k]
    else:
        data_dir = Path(store_harness.storage.filesystem.root) / ".uploads" / "data"
        assert os.listdir(data_dir) == [active.session_id]

    # A second run finds nothing more to do.
    again = await run_cleanup(store, older_than=HOUR, now=mark + HOUR)
    assert again == CleanupReport(scanned=1)


def backend_state(harness: StoreHarness, s3_client: Any) -> Any:
    """Everything the store keeps, as listed by the backend itself."""
    if harness.kind == "s3":
        return s3_leftovers(harness, s3_client)
    root = Path(harness.storage.filesystem.root)
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
        if p.is_file() and "tmp" not in p.parts
    )


async def test_dry_run_touches_nothing(
    store_harness: StoreHarness, s3_client_or_none: Any
) -> None:
    store = await store_harness.open()
    names = [f"dry/{i}.bin" for i in range(20)]
    for i, name in enumerate(names):
        await create(store, name, b"d" * i)
    await complete(store, "dry/done.txt", b"done")
    before = backend_state(store_harness, s3_client_or_none)
    actions: list[CleanupAction] = []
    report = await run_cleanup(
        store, older_than=HOUR, now=time.time() + HOUR, dry_run=True, on_action=actions.append
    )
    assert report == CleanupReport(scanned=20, aborted=20, forgotten=1,
                                   bytes_freed=sum(range(20)), dry_run=True)
    assert {a.verb for a in actions} == {"would abort", "would forget"}
    assert "would abort dry/5.bin idle 1h 5 bytes" in [a.line() for a in actions]
    assert backend_state(store_harness, s3_client_or_none) == before
    assert await unfinished_names(store) == set(names)


class ResumedWhileListed:
    """The store, except that a client resumes ``victim`` right after the job
    has listed it as idle: the job's re-check must notice."""

    def __init__(self, store: Store, victim: str) -> None:
        self._store = store
        self._victim = victim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def list_unfinished(self) -> AsyncIterator[UploadInfo]:
        async for info in self._store.list_unfinished():
            if info.name == self._victim:
                # The job gets the snapshot from before the client came back.
                await self._store.write(info, chunks(b"resumed"))
            yield info


async def test_upload_resumed_during_the_run_is_skipped(store_harness: StoreHarness) -> None:
    store = await store_harness.open()
    names = [f"u{i}" for i in range(5)]
    for name in names:
        await create(store, name)
    mark = time.time()
    await asyncio.sleep(0.02)
    wrapped = ResumedWhileListed(store, "u2")
    actions: list[CleanupAction] = []
    report = await run_cleanup(wrapped, older_than=HOUR, now=mark + HOUR,  # type: ignore[arg-type]
                               on_action=actions.append)
    assert (report.scanned, report.aborted, report.skipped_active, report.errors) == (5, 4, 1, 0)
    assert [a.line() for a in actions if a.verb == "skipped"] == [
        "skipped u2: active again since it was listed"
    ]
    assert await unfinished_names(store) == {"u2"}
    assert (await store.get("u2")).offset == len(b"resumed")


class FailsToCancel:
    def __init__(self, store: Store, broken: str) -> None:
        self._store = store
        self._broken = broken

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def cancel(self, name: str, *, session_id: str | None = None) -> None:
        if name == self._broken:
            raise StorageUnavailable("S3 AbortMultipartUpload failed: InternalError: boom")
        await self._store.cancel(name, session_id=session_id)


async def test_a_failed_abort_is_counted_and_the_rest_go_on(store_harness) -> None:
    store = await store_harness.open()
    for name in ("a", "b", "c"):
        await create(store, name)
    actions: list[CleanupAction] = []
    report = await run_cleanup(
        FailsToCancel(store, "b"), older_than=1, now=time.time() + HOUR,  # type: ignore[arg-type]
        on_action=actions.append,
    )
    assert (report.aborted, report.errors, report.exit_code) == (2, 1, 1)
    assert "error b: S3 AbortMultipartUpload failed: InternalError: boom" in [
        a.line() for a in actions
    ]
    assert await unfinished_names(store) == {"b"}


def test_format_idle() -> None:
    assert format_idle(3 * 86400 + 2 * 3600 + 59) == "3d2h"
    assert format_idle(86400 + 30) == "1d"
    assert format_idle(5 * 3600 + 12 * 60 + 3) == "5h12m"
    assert format_idle(65) == "1m5s"
    assert format_idle(0.4) == "0s"


# -- orphans --------------------------------------------------------------------


class InMemorySweeper:
    """A filesystem store that also 'finds' orphans, to test how the job uses
    the capability independently of any store that implements it."""

    def __init__(self, store: Store, orphans: list[Orphan], in_use: set[str]) -> None:
        self._store = store
        self.orphans = orphans
        self.in_use = in_use
        self.removed: list[str] = []
        self.asked: tuple[float, float] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def find_orphans(self, older_than: float, now: float) -> list[Orphan]:
        self.asked = (older_than, now)
        return list(self.orphans)

    async def remove_orphan(self, orphan: Orphan) -> int:
        if orphan.key in self.in_use:
            raise NotAnOrphan("a session record appeared for it")
        self.removed.append(orphan.key)
        return orphan.size


async def test_orphan_sweeper_capability_is_used(tmp_path: Path) -> None:
    config = config_from_mapping({"storage": {"filesystem": {"root": str(tmp_path)}}})
    store = await open_store(config.storage)
    now = time.time()
    orphans = [
        Orphan("multipart_upload", "p/a.bin", upload_id="u1", size=100, last_modified=now - 7200),
        Orphan("staged_data", "p/.uploads/staged/s1/", size=20, last_modified=now - 7200),
        Orphan("session_record", "p/.uploads/sessions/x.json", last_modified=now - 7200),
    ]
    sweeper = InMemorySweeper(store, orphans, in_use={"p/.uploads/sessions/x.json"})
    assert isinstance(sweeper, OrphanSweeper)

    actions: list[CleanupAction] = []
    dry = await run_cleanup(sweeper, older_than=HOUR, now=now, dry_run=True,  # type: ignore[arg-type]
                            on_action=actions.append)
    assert (dry.orphans, dry.bytes_freed, sweeper.removed) == (3, 120, [])
    actions.clear()
    report = await run_cleanup(sweeper, older_than=HOUR, now=now,  # type: ignore[arg-type]
                               on_action=actions.append)
    assert sweeper.asked == (HOUR, now)
    assert (report.orphans, report.skipped_active, report.bytes_freed) == (2, 1, 120)
    assert sorted(sweeper.removed) == ["p/.uploads/staged/s1/", "p/a.bin"]
    assert "removed orphan multipart_upload p/a.bin idle 2h 100 bytes" in [
        a.line() for a in actions
    ]


@pytest.fixture
def s3_like_upload_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    # moto dates every multipart upload 2010: a fresh one would look ancient.
    emulate_s3_upload_listing(monkeypatch)


async def test_s3_orphans_are_swept(store_harness_s3: StoreHarness, s3_client: Any,
                                    s3_like_upload_listing: None) -> None:
    harness = store_harness_s3
    store = await harness.open()
    bucket, prefix = harness.storage.s3.bucket, harness.storage.s3.prefix
    # Crash leftovers, made straight in the bucket: a multipart upload no
    # session record knows, and staged data of a session that is gone...
    mark_upload(s3_client, bucket, f"{prefix}stray.bin", prefix)
    stray = s3_client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}stray.bin")
    s3_client.upload_part(Bucket=bucket, Key=f"{prefix}stray.bin", UploadId=stray["UploadId"],
                          PartNumber=1, Body=b"p" * 100)
    staged_key = f"{prefix}.uploads/staged/deadbeef/{0:020d}"
    s3_client.put_object(Bucket=bucket, Key=staged_key, Body=b"y" * 50)
    # ... and a session record whose multipart upload was aborted.
    await create(store, "dead.bin", b"d" * 10)
    dead_id = s3_client.list_multipart_uploads(
        Bucket=bucket, Prefix=f"{prefix}dead.bin")["Uploads"][0]["UploadId"]
    s3_client.abort_multipart_upload(Bucket=bucket, Key=f"{prefix}dead.bin", UploadId=dead_id)
    dead_record = next(k for k in s3_leftovers(harness, s3_client)[1] if "/sessions/" in k)
    # Not the store's, or in use: these must survive.
    s3_client.create_multipart_upload(Bucket=bucket, Key="other/upload.bin")
    await complete(store, "done.txt", b"finished")
    mark = time.time()
    await asyncio.sleep(0.05)
    active = await create(store, "active.bin", b"x" * 10)
    now = mark + HOUR

    before = s3_leftovers(harness, s3_client)
    actions: list[CleanupAction] = []
    dry = await run_cleanup(store, older_than=HOUR, now=now, dry_run=True,
                            on_action=actions.append)
    assert s3_leftovers(harness, s3_client) == before
    assert (dry.aborted, dry.orphans, dry.errors) == (1, 3, 0)
    assert sorted(a.target for a in actions if a.verb == "would remove") == [
        f"orphan multipart_upload {prefix}stray.bin",
        f"orphan session_record {dead_record}",
        f"orphan staged_data {staged_key}",
    ]

    # Fresh orphans (younger than the threshold) are left: a create may be
    # between starting its multipart upload and writing its record.
    young = await run_cleanup(store, older_than=HOUR, now=time.time())
    assert (young.aborted, young.orphans, young.errors) == (0, 0, 0)
    assert s3_leftovers(harness, s3_client) == before

    actions.clear()
    report = await run_cleanup(store, older_than=HOUR, now=now, on_action=actions.append)
    # The record without its upload is idle too: the job aborts it as an
    # upload before it sweeps, so only two orphans are left by then.
    assert (report.aborted, report.orphans, report.forgotten, report.errors) == (1, 2, 1, 0)
    assert report.bytes_freed == 10 + 100 + 50
    assert f"removed orphan multipart_upload {prefix}stray.bin idle 1h 100 bytes" in [
        a.line() for a in actions
    ]
    mpus, keys = s3_leftovers(harness, s3_client)
    assert sorted(mpus) == sorted([f"{prefix}active.bin", "other/upload.bin"])
    assert staged_key not in keys and dead_record not in keys
    assert await unfinished_names(store) == {"active.bin"}
    assert (await store.get("active.bin")).offset == active.offset
    # The long-completed upload's record is forgotten; its object stays.
    with pytest.raises(UploadNotFound):
        await store.get("done.txt")
    assert read_object(harness, s3_client, "done.txt") == b"finished"

    again = await run_cleanup(store, older_than=HOUR, now=now)
    assert again == CleanupReport(scanned=1)


@pytest.fixture
async def store_harness_s3(tmp_path: Path, moto_endpoint: str, bucket: str
                           ) -> AsyncIterator[StoreHarness]:
    from tests.stores.fixtures import storage_config

    harness = StoreHarness("s3", storage_config("s3", tmp_path, moto_endpoint, bucket))
    yield harness
    await harness.close_all()


# -- callbacks ------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[str]]]:
    got: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(request.headers["X-Upload-Callback-Id"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/done", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/done", got
    await runner.cleanup()


async def test_pending_callbacks_are_redelivered(store_harness, receiver) -> None:
    import aiohttp

    url, got = receiver
    store = await store_harness.open()
    await store.save_pending("c" * 32, b'{"name":"a"}')
    config = config_from_mapping({"callbacks": {"on_complete_url": url, "secret": "s",
                                                "max_attempts": 1}})
    async with aiohttp.ClientSession() as session:
        notifier = CompletionNotifier(config.callbacks, store, session)
        dry = await run_cleanup(store, older_than=HOUR, now=time.time(), dry_run=True,
                                notifier=notifier)
        assert (dry.callbacks_delivered, dry.callbacks_pending, got) == (0, 1, [])
        report = await run_cleanup(store, older_than=HOUR, now=time.time(), notifier=notifier)
    assert (report.callbacks_delivered, report.callbacks_pending) == (1, 0)
    assert got == ["c" * 32]
    assert await store.list_pending() == []


# -- the command line -------------------------------------------------------------


def run_script(*args: str, env: dict[str, str] | None = None, module: bool = False,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("APP__")}
    base["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "app", "cleanup"] if module else [sys.executable,
                                                                       str(SCRIPT)]
    return subprocess.run(
        [*command, *args], env={**base, **(env or {})}, cwd=cwd or ROOT,
        capture_output=True, text=True, timeout=120,
    )


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("args", [
    [],
    ["--older-than", "soon"],
    ["--older-than", "0"],
    ["--older-than", "1h", "--bogus"],
    ["--older-than", "1h", "--concurrency", "0"],
])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    result = run_script(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = run_script("--older-than", "1h", "--config", str(tmp_path / "nope.yaml"))
    no_bucket = run_script("--older-than", "1h", "--config", str(
        write_config(tmp_path / "s3.yaml", {"storage": {"backend": "s3"}})))
    bad_env = run_script("--older-than", "1h", "--config", str(
        write_config(tmp_path / "ok.yaml", {"storage": {"filesystem": {"root": "x"}}})),
        env={"APP__STORAGE__PART_SIZE": "1KiB"})
    for result in (missing, no_bucket, bad_env):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("configuration error: "), result.stderr
    assert "storage.s3.bucket" in no_bucket.stderr
    assert "storage.part_size" in bad_env.stderr


@pytest.mark.parametrize("module", [False, True], ids=["script", "python-m-app"])
async def test_script_cleans_the_filesystem_store(tmp_path: Path, module: bool) -> None:
    root = tmp_path / "data"
    config_path = write_config(tmp_path / "app.yaml",
                               {"storage": {"filesystem": {"root": str(root)}}})
    store = await open_store(load_config(config_path, environ={}).storage)
    await create(store, "old/a.mp4", b"a" * 1234)
    await create(store, "old/b.mp4")
    await complete(store, "done.txt", b"done")
    await asyncio.sleep(1.1)

    dry = await asyncio.to_thread(run_script, "--config", str(config_path), "--older-than",
                                  "1s", "--dry-run", module=module, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert len(await unfinished_names(store)) == 2
    assert any(re.fullmatch(r"would abort old/a\.mp4 idle \d+s 1234 bytes", line)
               for line in dry.stdout.splitlines()), dry.stdout
    assert "would forget completed record of done.txt" in dry.stdout.splitlines()

    result = await asyncio.to_thread(run_script, "--config", str(config_path), "--older-than",
                                     "1s", "--json", module=module, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == {"scanned": 2, "aborted": 2, "orphans": 0, "skipped_active": 0,
                       "forgotten": 1, "errors": 0, "bytes_freed": 1234,
                       "callbacks_delivered": 0, "callbacks_pending": 0, "dry_run": False}
    # With --json the action lines go to stderr, so stdout stays one JSON object.
    assert sorted(line.split(" idle ")[0] for line in result.stderr.splitlines()) == [
        "aborted old/a.mp4", "aborted old/b.mp4", "forgot completed record of done.txt"]
    assert await unfinished_names(store) == set()
    assert (root / "done.txt").read_bytes() == b"done"

    text = await asyncio.to_thread(run_script, "--config", str(config_path), "--older-than",
                                   "1s", module=module, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        "summary scanned=0 aborted=0 orphans=0 skipped_active=0 forgotten=0 errors=0 "
        "bytes_freed=0 callbacks_delivered=0 callbacks_pending=0 dry_run=false"]


def s3_config(path: Path, endpoint: str, bucket: str) -> Path:
    return write_config(path, {"storage": {"backend": "s3", "s3": {
        "bucket": bucket, "endpoint_url": endpoint, "prefix": "uploads/",
        "addressing_style": "path", "max_attempts": 1, "connect_timeout": "2s",
        "read_timeout": "5s"}}})


async def test_script_against_s3(tmp_path: Path, moto_endpoint: str, bucket: str) -> None:
    config_path = s3_config(tmp_path / "app.yaml", moto_endpoint, bucket)
    store = await open_store(load_config(config_path, environ={}).storage)
    try:
        await create(store, "old.bin", b"z" * 99)
        await asyncio.sleep(1.1)
        result = await asyncio.to_thread(run_script, "--config", str(config_path),
                                         "--older-than", "1s", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["aborted"] == 1
        assert await unfinished_names(store) == set()
    finally:
        await store.close()


async def test_script_exits_1_when_storage_is_down(tmp_path: Path, relay: TcpRelay,
                                                   bucket: str) -> None:
    config_path = s3_config(tmp_path / "app.yaml", relay.url, bucket)
    relay.stop()
    result = await asyncio.to_thread(run_script, "--config", str(config_path),
                                     "--older-than", "1h")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error listing unfinished uploads: S3 ListObjectsV2 failed" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("summary scanned=0 aborted=0")
