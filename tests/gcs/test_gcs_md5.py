"""The MD5 followed through a chunked session: kept only when it covers
exactly the bytes stored, never a wrong digest."""

from __future__ import annotations

import hashlib

from app.core.model import CompletedObject, UploadInfo
from app.engine.model import Outcome
from app.http.app import completion_payload
from app.http.dialects.gcs_md5 import Md5Follower

SESSION = ".uploads/ids/gcs/" + "A" * 32


def info(offset: int, *, complete: bool = False) -> UploadInfo:
    done = CompletedObject(key="media/x", bucket="b", size=offset, etag="e", crc32c=0,
                           completed_at=1.0) if complete else None
    return UploadInfo(name=SESSION, session_id="s", offset=offset, total=None, part_size=1,
                      crc32c=0, content_type="x", completed=done, target="media/x")


def write(follower: Md5Follower, start: int, data: bytes, stored: int | None = None) -> bool:
    """One request as the engine runs it; True if it got a running MD5."""
    request = follower.request(SESSION)
    running = request.source(start)
    if running is not None:
        running.update(data)
    kept = len(data) if stored is None else stored
    request.settle(Outcome(info(start + kept), stored=kept))
    return running is not None


def test_chunks_in_order_chain_one_md5() -> None:
    follower = Md5Follower()
    assert write(follower, 0, b"abc")
    assert write(follower, 3, b"def")
    request = follower.request(SESSION)
    running = request.source(6)
    assert running is not None
    running.update(b"g")
    assert running.digest() == hashlib.md5(b"abcdefg").digest()


def test_bytes_hashed_but_not_stored_drop_it() -> None:
    follower = Md5Follower()
    assert write(follower, 0, b"abcdef", stored=4)
    assert len(follower) == 0
    assert not write(follower, 4, b"ef")


def test_a_write_from_another_offset_gets_none() -> None:
    follower = Md5Follower()
    write(follower, 0, b"abc")
    assert not write(follower, 5, b"zz")  # another process moved the session
    assert not write(follower, 7, b"zz")


def test_an_error_or_completion_forgets_and_capacity_bounds() -> None:
    follower = Md5Follower(capacity=2)
    write(follower, 0, b"abc")
    request = follower.request(SESSION)
    request.source(3)
    request.settle(None)
    assert len(follower) == 0
    for n in range(5):
        follower.request(f"{SESSION[:-1]}{n}").source(0)
        follower._keep(f"{SESSION[:-1]}{n}", 1, hashlib.md5())
    assert len(follower) == 2


def test_the_completion_callback_names_the_object_not_the_session() -> None:
    payload = completion_payload(info(3, complete=True))
    assert payload["name"] == "media/x"
    assert "A" * 32 not in str(payload)
