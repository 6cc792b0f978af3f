"""Filesystem-store behaviour the black-box conformance suite cannot see:
on-disk layout, crash leftovers, containment under the root, OS errors."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import google_crc32c
import pytest

from app.config import StorageConfig
from app.config import replace as replace_config
from app.errors import InvalidName, OffsetMismatch, StorageUnavailable, UploadNotFound
from app.stores.base import CallbackOutbox, HealthCheck
from app.stores.filesystem import fsio as fs_module
from app.stores.filesystem.store import FilesystemStore
from tests.stores.fixtures import storage_config
from tests.stores.kit.helpers import append, chunked, new_upload, payload

MIB = 1024 * 1024


@pytest.fixture
def storage(tmp_path: Path) -> StorageConfig:
    return storage_config("filesystem", tmp_path, None, None).storage


@pytest.fixture
def root(storage: StorageConfig) -> Path:
    return Path(storage.filesystem.root).resolve()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the root that nothing may ever write into."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "target.txt").write_bytes(b"secret")
    return path


@pytest.fixture
async def store(storage: StorageConfig) -> AsyncIterator[FilesystemStore]:
    opened = await FilesystemStore.open(storage)
    yield opened
    await opened.close()


def sidecar_path(root: Path, name: str) -> Path:
    return root / ".uploads" / "sessions" / (hashlib.sha256(name.encode()).hexdigest() + ".json")


def data_path(root: Path, session_id: str) -> Path:
    return root / ".uploads" / "data" / session_id


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def visible_files(root: Path) -> list[str]:
    """Everything under the root a reader of objects would see."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not p.relative_to(root).parts[0] == ".uploads" and not p.is_dir()
    )


async def test_opens_the_root_and_declares_its_capabilities(
    store: FilesystemStore, root: Path
) -> None:
    assert isinstance(store, HealthCheck)
    assert isinstance(store, CallbackOutbox)
    for sub in ("sessions", "data", "callbacks", "tmp"):
        assert (root / ".uploads" / sub).is_dir()


async def test_the_object_appears_only_when_finished(store: FilesystemStore, root: Path) -> None:
    data = payload(3 * MIB, seed=1)
    info = await new_upload(store, "videos/a.mp4", total=len(data))
    info = await append(store, info, data[: 2 * MIB])
    assert visible_files(root) == []
    info = await append(store, info, data[2 * MIB :])
    assert visible_files(root) == []
    done = await store.finish(info)
    assert visible_files(root) == ["videos/a.mp4"]
    assert (root / "videos" / "a.mp4").read_bytes() == data
    assert not data_path(root, info.session_id).exists()
    assert done.completed is not None
    assert done.completed.bucket == str(root)
    assert done.completed.key == "videos/a.mp4"
    crc = google_crc32c.value(data)
    assert done.completed.etag == f'"{crc:08x}-{len(data)}"'


async def test_the_sidecar_holds_the_session(store: FilesystemStore, root: Path) -> None:
    info = await new_upload(
        store, "docs/report.pdf", total=10, content_type="application/pdf",
        metadata={"k": "v"}, owner="alice",
    )
    info = await append(store, info, b"12345")
    doc = json.loads(sidecar_path(root, "docs/report.pdf").read_text())
    assert doc["name"] == "docs/report.pdf"
    assert doc["session_id"] == info.session_id
    assert (doc["offset"], doc["total"], doc["crc32c"]) == (5, 10, google_crc32c.value(b"12345"))
    assert doc["part_size"] == info.part_size
    assert (doc["content_type"], doc["metadata"], doc["owner"]) == (
        "application/pdf", {"k": "v"}, "alice",
    )
    assert doc["created_at"] <= doc["updated_at"]
    assert doc["completed"] is None
    assert data_path(root, info.session_id).read_bytes() == b"12345"

    info = await append(store, info, b"67890")
    await store.finish(info, md5=hashlib.md5(b"1234567890").digest())
    completed = json.loads(sidecar_path(root, "docs/report.pdf").read_text())["completed"]
    assert set(completed) == {"key", "bucket", "size", "etag", "crc32c", "completed_at", "md5"}
    assert completed["size"] == 10
    assert os.listdir(root / ".uploads" / "tmp") == []


async def test_bytes_past_the_recorded_offset_are_cut_before_appending(
    storage: StorageConfig, root: Path
) -> None:
    """A crash after writing data but before recording it leaves a longer data file."""
    data = payload(50_000, seed=2)
    store = await FilesystemStore.open(storage)
    info = await append(store, await new_upload(store, "crash.bin", total=len(data)), data[:20_000])
    with data_path(root, info.session_id).open("ab") as f:
        f.write(b"unacknowledged garbage" * 100)

    restarted = await FilesystemStore.open(storage)
    info = await restarted.get("crash.bin")
    assert info.offset == 20_000
    info = await append(restarted, info, data[20_000:])
    assert info.crc32c == google_crc32c.value(data)
    await restarted.finish(info)
    assert (root / "crash.bin").read_bytes() == data


async def test_bytes_past_the_total_are_cut_at_finish(store: FilesystemStore, root: Path) -> None:
    info = await append(store, await new_upload(store, "exact.bin", total=4), b"abcd")
    with data_path(root, info.session_id).open("ab") as f:
        f.write(b"tail")
    await store.finish(info)
    assert (root / "exact.bin").read_bytes() == b"abcd"


async def test_a_data_file_shorter_than_recorded_is_reported_truthfully(
    store: FilesystemStore, root: Path
) -> None:
    """Only possible with fsync off or a damaged disk: never claim missing bytes."""
    data = payload(500, seed=3)
    info = await append(store, await new_upload(store, "short.bin"), data)
    os.truncate(data_path(root, info.session_id), 100)
    with pytest.raises(OffsetMismatch) as caught:
        await append(store, info, b"more")
    assert caught.value.offset == 100
    repaired = await store.get("short.bin")
    assert (repaired.offset, repaired.crc32c) == (100, google_crc32c.value(data[:100]))


async def test_a_crash_between_completion_and_rename_is_rolled_forward(
    storage: StorageConfig, root: Path
) -> None:
    store = await FilesystemStore.open(storage)
    info = await append(store, await new_upload(store, "roll.bin", total=5), b"roll!")
    done = await store.finish(info)
    # Recreate the state right after the sidecar was marked, before the rename.
    os.replace(root / "roll.bin", data_path(root, info.session_id))

    restarted = await FilesystemStore.open(storage)
    again = await restarted.get("roll.bin")
    assert again.completed == done.completed
    assert (root / "roll.bin").read_bytes() == b"roll!"
    assert not data_path(root, info.session_id).exists()


# -- several processes on one root ---------------------------------------------------


async def stalling(
    first: bytes, later: bytes, sent: asyncio.Event, resume: asyncio.Event
) -> AsyncIterator[bytes]:
    """A body that sends ``first``, stalls (a half-open request) and later resumes."""
    yield first
    sent.set()
    await resume.wait()
    yield later


# A stall before the first batch (everything still pending) and one after a whole
# batch reached the data file (the next batch is checked mid-stream).
@pytest.mark.parametrize("first_size", [500, 4 * MIB + 5])
async def test_a_stalled_writer_on_another_instance_cannot_undo_a_completion(
    storage: StorageConfig, root: Path, first_size: int
) -> None:
    stale_store = await FilesystemStore.open(storage)
    fresh_store = await FilesystemStore.open(storage)
    late = b"L" * (4 * MIB if first_size > MIB else 100)  # a whole batch, or a bit
    data = payload(1000 + first_size + len(late) + 2000, seed=11)
    info = await append(
        stale_store, await new_upload(stale_store, "two.bin", total=len(data)), data[:1000]
    )
    sent, resume = asyncio.Event(), asyncio.Event()
    stale = asyncio.create_task(
        stale_store.write(info, stalling(data[1000 : 1000 + first_size], late, sent, resume))
    )
    await asyncio.wait_for(sent.wait(), 10)

    # The client reconnects through the other instance, probes, resumes and completes.
    probed = await fresh_store.get("two.bin")
    assert probed.offset == 1000
    done = await fresh_store.finish(await append(fresh_store, probed, data[1000:]))
    assert done.completed is not None
    sidecar = sidecar_path(root, "two.bin").read_bytes()

    resume.set()  # the stalled body finally moves (or times out) on the first instance
    with pytest.raises(OffsetMismatch) as caught:
        await asyncio.wait_for(stale, 10)
    assert caught.value.offset == len(data)

    assert sidecar_path(root, "two.bin").read_bytes() == sidecar
    for store in (stale_store, fresh_store, await FilesystemStore.open(storage)):
        again = await store.get("two.bin")
        assert (again.session_id, again.offset, again.completed) == (
            done.session_id, len(data), done.completed,
        )
    assert (root / "two.bin").read_bytes() == data
    assert not data_path(root, info.session_id).exists()
    with pytest.raises(UploadNotFound):
        await append(stale_store, info, b"more")
    assert (root / "two.bin").read_bytes() == data


async def test_a_writer_taken_over_by_another_instance_stops_at_its_next_batch(
    storage: StorageConfig, root: Path
) -> None:
    """The first writer's unrecorded batch is cut off by the second writer's start
    at the same offset; the first must then record nothing, or the sidecar would
    count bytes that are no longer in the data file."""
    first_store = await FilesystemStore.open(storage)
    second_store = await FilesystemStore.open(storage)
    data = payload(3000 + 4 * MIB, seed=12)
    info = await append(first_store, await new_upload(first_store, "takeover.bin"), data[:1000])
    first_sent, first_resume = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(
        first_store.write(
            info, stalling(data[1000 : 1000 + 4 * MIB], b"F" * 100, first_sent, first_resume)
        )
    )
    await asyncio.wait_for(first_sent.wait(), 10)
    assert data_path(root, info.session_id).stat().st_size == 1000 + 4 * MIB  # not recorded

    second_sent, second_resume = asyncio.Event(), asyncio.Event()
    probed = await second_store.get("takeover.bin")
    assert probed.offset == 1000
    second = asyncio.create_task(
        second_store.write(
            probed, stalling(data[1000:2000], data[2000:3000], second_sent, second_resume)
        )
    )
    await asyncio.wait_for(second_sent.wait(), 10)

    first_resume.set()  # the first writer ends before the second one records
    with pytest.raises(OffsetMismatch) as caught:
        await asyncio.wait_for(first, 10)
    assert caught.value.offset == 1000
    assert (await first_store.get("takeover.bin")).offset == 1000

    second_resume.set()
    state = await asyncio.wait_for(second, 10)
    assert (state.offset, state.crc32c) == (3000, google_crc32c.value(data[:3000]))
    state = await append(second_store, state, data[3000:], total=len(data))
    await second_store.finish(state)
    assert (root / "takeover.bin").read_bytes() == data


async def test_lock_files_live_as_long_as_their_session(
    store: FilesystemStore, root: Path
) -> None:
    locks = root / ".uploads" / "locks"
    await store.finish(await append(store, await new_upload(store, "kept.bin", total=1), b"k"))
    info = await new_upload(store, "gone.bin")
    assert len(list(locks.iterdir())) == 2
    await store.cancel("gone.bin")
    with pytest.raises(UploadNotFound):
        await append(store, info, b"x")
    with pytest.raises(UploadNotFound):
        await store.cancel("gone.bin")
    assert [p.name for p in locks.iterdir()] == [
        hashlib.sha256(b"kept.bin").hexdigest() + ".lock"
    ]


async def test_blocking_io_runs_off_the_event_loop(
    store: FilesystemStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[str] = set()
    real_write_all = fs_module.write_all

    def spy(fd: int, data: bytes) -> None:
        threads.add(threading.current_thread().name)
        real_write_all(fd, data)

    monkeypatch.setattr(fs_module, "write_all", spy)
    info = await new_upload(store, "threads.bin", total=6 * MIB)
    info = await store.write(info, chunked(payload(6 * MIB), 1024))
    await store.finish(info)
    assert threads and threading.main_thread().name not in threads


async def test_disk_full_mid_write_keeps_the_durable_prefix(
    store: FilesystemStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = payload(9 * MIB, seed=4)
    real_write_all = fs_module.write_all
    big_writes = 0

    def fill_up(fd: int, chunk: bytes) -> None:
        nonlocal big_writes
        if len(chunk) >= MIB:
            big_writes += 1
            if big_writes == 2:
                real_write_all(fd, chunk[:1000])  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, chunk)

    monkeypatch.setattr(fs_module, "write_all", fill_up)
    info = await new_upload(store, "full.bin", total=len(data))
    with pytest.raises(StorageUnavailable) as caught:
        await append(store, info, data, chunk_size=MIB)
    assert "ENOSPC" in caught.value.message
    assert str(root) in caught.value.message
    kept = await store.get("full.bin")
    assert kept.offset == 4 * MIB  # the first batch, and not one byte of the second
    assert kept.crc32c == google_crc32c.value(data[: kept.offset])

    monkeypatch.setattr(fs_module, "write_all", real_write_all)
    kept = await append(store, kept, data[kept.offset :])
    await store.finish(kept)
    assert (root / "full.bin").read_bytes() == data


async def test_os_errors_become_storage_unavailable(store: FilesystemStore, root: Path) -> None:
    (root / ".uploads" / "tmp").rmdir()
    (root / ".uploads" / "tmp").write_bytes(b"not a directory")
    with pytest.raises(StorageUnavailable) as caught:
        await store.check_health()
    assert "ENOTDIR" in caught.value.message and ".uploads/tmp" in caught.value.message
    with pytest.raises(StorageUnavailable):
        await new_upload(store, "x.bin")
    with pytest.raises(StorageUnavailable):
        await store.save_pending("cb", b"{}")


async def test_health_check_fails_when_the_root_is_gone(
    store: FilesystemStore, root: Path
) -> None:
    await store.check_health()
    shutil.rmtree(root)
    with pytest.raises(StorageUnavailable, match="ENOENT"):
        await store.check_health()


async def test_fsync_can_be_turned_off(tmp_path: Path) -> None:
    config = replace_config(
        storage_config("filesystem", tmp_path, None, None),
        storage={"filesystem": {"fsync": False}},
    )
    store = await FilesystemStore.open(config.storage)
    info = await append(store, await new_upload(store, "fast.bin", total=3), b"abc")
    await store.finish(info)
    assert (tmp_path / "data" / "fast.bin").read_bytes() == b"abc"


async def test_stale_temp_files_are_swept_at_open(storage: StorageConfig, root: Path) -> None:
    await FilesystemStore.open(storage)
    tmp = root / ".uploads" / "tmp"
    old, recent = tmp / "old.tmp", tmp / "recent.tmp"
    old.write_bytes(b"x")
    recent.write_bytes(b"y")
    long_ago = time.time() - 2 * 3600
    os.utime(old, (long_ago, long_ago))
    await FilesystemStore.open(storage)
    assert not old.exists() and recent.exists()


# -- containment under the root ------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../../x",
        "/absolute/x",
        "a\x00b",
        "a/\x00",
        "x" * 2000,
        ("y" * 300) + "/z",  # legal for the protocol, too long for one path segment here
        ".uploads/sessions/x.json",
        ".UPLOADS/data/x",
        "a//b",
        "a/./b",
        "",
    ],
)
async def test_bad_names_are_refused_everywhere(
    store: FilesystemStore, root: Path, outside: Path, tmp_path: Path, name: str
) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(InvalidName):
        await new_upload(store, name)
    with pytest.raises(InvalidName):
        await store.get(name)
    with pytest.raises(InvalidName):
        await store.cancel(name)
    real = await new_upload(store, "real.bin", total=1)
    forged = replace(real, name=name)
    with pytest.raises(InvalidName):
        await store.write(forged, chunked(b"!"))
    with pytest.raises(InvalidName):
        await store.finish(forged)
    await store.cancel("real.bin")
    assert snapshot(tmp_path) == before


async def test_a_symlink_in_the_root_is_never_followed(
    store: FilesystemStore, root: Path, outside: Path
) -> None:
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "evil.txt").symlink_to(outside / "target.txt")
    before = snapshot(outside)
    for name in ("link/x.bin", "link/deeper/x.bin", "evil.txt"):
        with pytest.raises(InvalidName, match="symbolic link"):
            await new_upload(store, name)
    assert snapshot(outside) == before
    assert (outside / "target.txt").read_bytes() == b"secret"


async def test_a_symlinked_directory_component_is_never_followed(
    store: FilesystemStore, root: Path, outside: Path
) -> None:
    (root / "a").mkdir()
    (root / "a" / "b").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(InvalidName, match="'a/b'"):
        await new_upload(store, "a/b/c.bin")
    assert snapshot(outside) == before


@pytest.mark.parametrize("name", ["late/x.bin", "late.txt"])
async def test_a_symlink_planted_after_create_is_refused_at_finish(
    store: FilesystemStore, root: Path, outside: Path, name: str
) -> None:
    info = await append(store, await new_upload(store, name, total=5), b"hello")
    if "/" in name:
        (root / "late").symlink_to(outside, target_is_directory=True)
    else:
        (root / name).symlink_to(outside / "target.txt")
    before = snapshot(outside)
    with pytest.raises(InvalidName):
        await store.finish(info)
    assert snapshot(outside) == before
    # The upload is untouched and finishes once the obstacle is gone.
    state = await store.get(name)
    assert (state.offset, state.completed) == (5, None)
    (root / name.split("/")[0]).unlink()
    await store.finish(state)
    assert (root / name).read_bytes() == b"hello"


async def test_a_directory_where_the_object_should_go_is_refused(
    store: FilesystemStore, root: Path
) -> None:
    (root / "dir.bin").mkdir()
    with pytest.raises(InvalidName, match="directory"):
        await new_upload(store, "dir.bin")

    info = await append(store, await new_upload(store, "later.bin", total=2), b"ok")
    (root / "later.bin").mkdir()
    with pytest.raises(InvalidName, match="directory"):
        await store.finish(info)
    assert (await store.get("later.bin")).completed is None
    (root / "later.bin").rmdir()
    await store.finish(info)
    assert (root / "later.bin").read_bytes() == b"ok"


async def test_a_file_where_a_directory_is_needed_is_refused(
    store: FilesystemStore, root: Path
) -> None:
    await store.finish(await append(store, await new_upload(store, "f", total=1), b"1"))
    with pytest.raises(InvalidName, match="file"):
        await new_upload(store, "f/child.bin")

    info = await append(store, await new_upload(store, "g/child.bin", total=1), b"2")
    await store.finish(await append(store, await new_upload(store, "g", total=0), b""))
    with pytest.raises(InvalidName):
        await store.finish(info)
    assert (await store.get("g/child.bin")).completed is None


async def test_a_damaged_session_record_is_reported_and_can_be_replaced(
    store: FilesystemStore, root: Path
) -> None:
    await new_upload(store, "damaged.bin")
    await new_upload(store, "fine.bin")
    sidecar_path(root, "damaged.bin").write_bytes(b"{not json")
    with pytest.raises(StorageUnavailable, match="damaged"):
        await store.get("damaged.bin")
    assert [info.name async for info in store.list_unfinished()] == ["fine.bin"]
    fresh = await new_upload(store, "damaged.bin")
    assert (await store.get("damaged.bin")).session_id == fresh.session_id

    sidecar_path(root, "damaged.bin").write_bytes(b"[]")
    await store.cancel("damaged.bin")
    assert not sidecar_path(root, "damaged.bin").exists()


STORE_FOLDERS = [".uploads", ".uploads/data", ".uploads/sessions", ".uploads/callbacks",
                 ".uploads/owners", ".uploads/tmp", ".uploads/locks"]


def plant_link(root: Path, folder: str, outside: Path) -> None:
    """Replace one of the store's own folders by a symlink to ``outside``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / folder
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("folder", STORE_FOLDERS)
async def test_a_symlinked_store_folder_is_refused_at_start_up(
    storage: StorageConfig, root: Path, outside: Path, folder: str
) -> None:
    plant_link(root, folder, outside)
    before = snapshot(outside)
    with pytest.raises(StorageUnavailable, match=f"'{folder}' under .* is a symbolic link"):
        await FilesystemStore.open(storage)
    assert snapshot(outside) == before


@pytest.mark.parametrize("folder", [".uploads", ".uploads/data", ".uploads/sessions",
                                    ".uploads/tmp", ".uploads/locks"])
async def test_a_store_folder_swapped_for_a_symlink_later_refuses_every_request(
    store: FilesystemStore, root: Path, outside: Path, folder: str
) -> None:
    info = await append(store, await new_upload(store, "early.bin", total=10), b"hello")
    plant_link(root, folder, outside)
    before = snapshot(outside)
    with pytest.raises(StorageUnavailable, match="symbolic link"):
        await new_upload(store, "late.bin")
    with pytest.raises(StorageUnavailable, match="symbolic link"):
        await store.get("early.bin")
    with pytest.raises(StorageUnavailable, match="symbolic link"):
        await append(store, info, b"world")
    with pytest.raises(StorageUnavailable, match="symbolic link"):
        await store.finish(info)
    with pytest.raises(StorageUnavailable, match="symbolic link"):
        await store.check_health()
    with pytest.raises(StorageUnavailable, match="symbolic link"):
        await store.save_pending("cb", b"{}")
    with pytest.raises(StorageUnavailable, match="symbolic link"):
        [i async for i in store.list_unfinished()]
    assert snapshot(outside) == before


async def test_a_store_folder_replaced_by_another_directory_is_refused(
    store: FilesystemStore, root: Path
) -> None:
    data = root / ".uploads" / "data"
    data.rename(root / "moved")
    data.mkdir()
    with pytest.raises(StorageUnavailable, match="replaced since start-up"):
        await new_upload(store, "x.bin")
