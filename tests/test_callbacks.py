"""Completion callbacks against a real aiohttp app playing the main service."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from app.callbacks.notifier import CompletionNotifier, sign, verify
from app.config import CallbacksConfig
from app.errors import StorageUnavailable
from app.stores.base import CallbackOutbox

SECRET = "s3cret"
PAYLOAD: dict[str, Any] = {
    "name": "videos/a.mp4",
    "key": "uploads/videos/a.mp4",
    "bucket": "media",
    "size": 4096,
    "content_type": "video/mp4",
    "etag": '"abc-2"',
    "crc32c": "yZRlqg==",
    "metadata": {"user": "alice"},
    "owner": "u-42",
    "completed_at": 1_700_000_000.5,
}


class MemoryOutbox:
    """The CallbackOutbox capability, in memory (real stores are tested elsewhere)."""

    def __init__(self) -> None:
        self.pending: dict[str, bytes] = {}

    async def save_pending(self, callback_id: str, payload: bytes) -> None:
        self.pending[callback_id] = payload

    async def delete_pending(self, callback_id: str) -> None:
        self.pending.pop(callback_id, None)

    async def list_pending(self) -> list[tuple[str, bytes]]:
        return list(self.pending.items())


class FailingOutbox(MemoryOutbox):
    async def save_pending(self, callback_id: str, payload: bytes) -> None:
        raise StorageUnavailable("disk on fire")


class Receiver:
    """The main application's completion endpoint."""

    def __init__(self) -> None:
        self.received: list[tuple[CIMultiDictProxy[str], bytes]] = []
        #: Answers for the next requests, in order; 200 once exhausted.
        self.statuses: list[int] = []
        #: When set, requests wait for it before answering.
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append((request.headers, await request.read()))
        self.arrived.set()
        if self.gate is not None:
            # Bounded so the test server can shut down even if the test fails.
            await asyncio.wait_for(self.gate.wait(), 10)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    def ids(self) -> list[str]:
        return [headers["X-Upload-Callback-Id"] for headers, _ in self.received]


@pytest.fixture
async def receiver(aiohttp_server) -> Receiver:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/done", rec.handle)
    server = await aiohttp_server(app)
    rec.url = str(server.make_url("/done"))
    return rec


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client:
        yield client


class SleepRecorder:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/done"


def notifier(
    url: str | None,
    session: aiohttp.ClientSession,
    outbox: CallbackOutbox | None,
    *,
    sleep: Any = None,
    rng: Any = None,
    **config: Any,
) -> CompletionNotifier:
    config.setdefault("timeout", 5.0)
    return CompletionNotifier(
        CallbacksConfig(on_complete_url=url, secret=SECRET, **config),
        outbox,
        session,
        sleep=sleep or SleepRecorder(),
        rng=rng or (lambda: 1.0),
    )


def test_memory_outbox_is_a_callback_outbox():
    assert isinstance(MemoryOutbox(), CallbackOutbox)


# --- signature -------------------------------------------------------------------


async def test_delivered_with_a_valid_signature(receiver, session):
    outbox = MemoryOutbox()
    notes = notifier(receiver.url, session, outbox)
    await notes.notify(PAYLOAD)
    await notes.close(5)

    [(headers, body)] = receiver.received
    assert json.loads(body) == PAYLOAD
    assert headers["Content-Type"] == "application/json"
    callback_id = headers["X-Upload-Callback-Id"]
    assert len(callback_id) == 32 and int(callback_id, 16) >= 0
    timestamp = headers["X-Upload-Timestamp"]
    signature = headers["X-Upload-Signature"]
    assert signature.startswith("sha256=")
    assert abs(int(timestamp) - time.time()) < 60

    assert verify(SECRET, timestamp, signature, body)
    assert not verify("wrong secret", timestamp, signature, body)
    assert not verify(SECRET, timestamp, signature, body + b" ")
    assert not verify(SECRET, str(int(timestamp) + 1), signature, body)
    assert not verify(SECRET, timestamp, signature, body, now=int(timestamp) + 301)
    assert not verify(SECRET, timestamp, signature, body, now=int(timestamp) - 301)
    assert verify(SECRET, timestamp, signature, body, now=int(timestamp) + 299)
    assert outbox.pending == {}


def test_sign_is_hmac_sha256_over_timestamp_dot_body():
    expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert sign("k", 1_700_000_000, b"{}") == expected


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [
        ("abc", None),
        ("", None),
        ("+1700000000", None),
        (" 1700000000", None),
        ("1_700_000_000", None),
        ("1700000000", ""),
        ("1700000000", "deadbeef"),
        ("1700000000", "sha256="),
        ("1700000000", "sha256=zz\u00e9"),
    ],
)
def test_verify_rejects_malformed_headers(timestamp, signature):
    good = "sha256=" + sign(SECRET, 1_700_000_000, b"{}")
    assert verify(SECRET, "1700000000", good, b"{}", now=1_700_000_000)
    assert not verify(
        SECRET, timestamp, good if signature is None else signature, b"{}", now=1_700_000_000
    )


async def test_read_only_metadata_is_serialised(receiver, session):
    notes = notifier(receiver.url, session, MemoryOutbox())
    await notes.notify({**PAYLOAD, "metadata": MappingProxyType({"user": "alice"})})
    await notes.close(5)
    assert json.loads(receiver.received[0][1])["metadata"] == {"user": "alice"}


# --- durability and background delivery ---------------------------------------------


async def test_notify_is_durable_on_return_and_does_not_wait(receiver, session):
    receiver.gate = asyncio.Event()
    outbox = MemoryOutbox()
    notes = notifier(receiver.url, session, outbox)

    await asyncio.wait_for(notes.notify(PAYLOAD), 1)
    [(callback_id, body)] = outbox.pending.items()
    assert json.loads(body) == PAYLOAD

    await asyncio.wait_for(receiver.arrived.wait(), 5)
    # The receiver holds the request: still pending, and notify returned long ago.
    assert callback_id in outbox.pending
    receiver.gate.set()
    await notes.close(5)
    assert receiver.ids() == [callback_id]
    assert receiver.received[0][1] == body
    assert outbox.pending == {}


async def test_failed_save_fails_notify_and_sends_nothing(receiver, session):
    notes = notifier(receiver.url, session, FailingOutbox())
    with pytest.raises(StorageUnavailable):
        await notes.notify(PAYLOAD)
    await notes.close(5)
    assert receiver.received == []


async def test_disabled_notifier_does_nothing(session):
    outbox = MemoryOutbox()
    notes = CompletionNotifier(CallbacksConfig(), outbox, session)
    assert not notes.enabled
    await notes.notify(PAYLOAD)
    assert outbox.pending == {}
    await outbox.save_pending("old", b"{}")
    assert await notes.redeliver_pending() == (0, 1)
    await notes.close(1)


async def test_without_outbox_delivery_is_best_effort_and_says_so(receiver, session, caplog):
    caplog.set_level(logging.WARNING, logger="app.callbacks")
    notes = notifier(receiver.url, session, None)
    assert "best-effort" in caplog.text
    await notes.notify(PAYLOAD)
    await notes.close(5)
    assert len(receiver.received) == 1
    assert await notes.redeliver_pending() == (0, 0)


# --- retries -------------------------------------------------------------------


async def test_retried_until_the_receiver_recovers(receiver, session):
    receiver.statuses = [500, 500, 200]
    outbox = MemoryOutbox()
    sleep = SleepRecorder()
    notes = notifier(receiver.url, session, outbox, sleep=sleep, backoff=1.0, max_attempts=5)
    await notes.notify(PAYLOAD)
    await notes.close(5)

    assert len(receiver.received) == 3
    assert len(set(receiver.ids())) == 1
    for headers, body in receiver.received:
        assert verify(SECRET, headers["X-Upload-Timestamp"], headers["X-Upload-Signature"], body)
    assert sleep.delays == [1.0, 2.0]
    assert outbox.pending == {}


async def test_deliver_reports_success_and_failure(receiver, session):
    outbox = MemoryOutbox()
    await outbox.save_pending("c1", b'{"a":1}')
    notes = notifier(receiver.url, session, outbox, max_attempts=2)
    assert await notes.deliver("c1", b'{"a":1}') is True
    assert outbox.pending == {}

    receiver.statuses = [503, 503]
    await outbox.save_pending("c2", b'{"a":2}')
    assert await notes.deliver("c2", b'{"a":2}') is False
    assert list(outbox.pending) == ["c2"]


async def test_backoff_doubles_with_full_jitter_and_a_cap(receiver, session):
    receiver.statuses = [500] * 5
    sleep = SleepRecorder()
    notes = notifier(receiver.url, session, MemoryOutbox(), sleep=sleep, rng=lambda: 0.5,
                     backoff=20.0, max_attempts=5)
    assert await notes.deliver("c", b"{}") is False
    # 20, 40, 80 -> 60 (cap), 160 -> 60, each scaled by the jitter draw.
    assert sleep.delays == [10.0, 20.0, 30.0, 30.0]


async def test_redirects_are_not_followed(aiohttp_server, receiver, session):
    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(receiver.url)

    app = web.Application()
    app.router.add_post("/done", redirect)
    server = await aiohttp_server(app)
    notes = notifier(str(server.make_url("/done")), session, MemoryOutbox(), max_attempts=1)
    assert await notes.deliver("c", b"{}") is False
    assert receiver.received == []


async def test_exhausted_attempts_stay_pending_then_redelivered(receiver, session):
    receiver.statuses = [500, 500, 500]
    outbox = MemoryOutbox()
    notes = notifier(receiver.url, session, outbox, max_attempts=3)
    await notes.notify(PAYLOAD)
    await notes.close(5)
    assert len(receiver.received) == 3
    [(callback_id, body)] = outbox.pending.items()

    assert await notes.redeliver_pending() == (1, 0)
    assert outbox.pending == {}
    assert receiver.ids() == [callback_id] * 4
    assert receiver.received[-1][1] == body


async def test_receiver_down_keeps_it_pending(receiver, session):
    outbox = MemoryOutbox()
    down = notifier(closed_port_url(), session, outbox, max_attempts=2)
    await down.notify(PAYLOAD)
    await down.close(5)
    assert len(outbox.pending) == 1

    up = notifier(receiver.url, session, outbox)
    assert await up.redeliver_pending() == (1, 0)
    assert json.loads(receiver.received[0][1]) == PAYLOAD


async def test_slow_receiver_times_out_and_is_retried(receiver, session):
    receiver.gate = asyncio.Event()
    outbox = MemoryOutbox()
    notes = notifier(receiver.url, session, outbox, timeout=0.2, max_attempts=2)
    try:
        assert await notes.deliver("c", b"{}") is False
    finally:
        receiver.gate.set()
    assert len(receiver.received) == 2


# --- crashes, shutdown and redelivery -----------------------------------------------


async def test_callback_of_a_killed_process_is_delivered_by_the_next_one(receiver, session):
    outbox = MemoryOutbox()  # stands in for the store both processes share
    gate = receiver.gate = asyncio.Event()
    first = notifier(receiver.url, session, outbox)
    await first.notify(PAYLOAD)
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    # Killed before the receiver answered: nothing confirmed, the entry stays.
    await first.close(0)
    [(callback_id, body)] = outbox.pending.items()

    receiver.gate = None
    gate.set()
    second = notifier(receiver.url, session, outbox)
    assert await second.redeliver_pending() == (1, 0)
    assert outbox.pending == {}
    # The duplicate is recognisable: same id, same signed body.
    assert receiver.ids() == [callback_id, callback_id]
    assert receiver.received[-1][1] == body


async def test_saved_but_never_sent_is_delivered_by_a_new_instance(receiver, session):
    outbox = MemoryOutbox()
    first = notifier(receiver.url, session, outbox)
    await first.notify(PAYLOAD)
    # Cancelled before it could even connect, like a process killed right after the save.
    await first.close(0)
    assert len(outbox.pending) == 1

    second = notifier(receiver.url, session, outbox)
    assert await second.redeliver_pending() == (1, 0)
    assert outbox.pending == {}
    assert json.loads(receiver.received[-1][1]) == PAYLOAD
    # The cancelled instance does not think it is still sending it.
    await outbox.save_pending("again", b"{}")
    assert await first.redeliver_pending() == (1, 0)


async def test_redelivery_skips_callbacks_already_in_flight(receiver, session):
    receiver.gate = asyncio.Event()
    outbox = MemoryOutbox()
    notes = notifier(receiver.url, session, outbox)
    await notes.notify(PAYLOAD)
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    assert await notes.redeliver_pending() == (0, 1)
    receiver.gate.set()
    await notes.close(5)
    assert len(receiver.received) == 1
    assert outbox.pending == {}


async def test_redelivers_many(receiver, session):
    outbox = MemoryOutbox()
    for i in range(20):
        await outbox.save_pending(f"{i:032x}", json.dumps({"i": i}).encode())
    notes = notifier(receiver.url, session, outbox)
    assert await notes.redeliver_pending() == (20, 0)
    assert sorted(json.loads(body)["i"] for _, body in receiver.received) == list(range(20))


async def test_notify_while_closing_leaves_it_pending(receiver, session):
    outbox = MemoryOutbox()
    notes = notifier(receiver.url, session, outbox)
    await notes.close(1)
    await notes.notify(PAYLOAD)
    assert len(outbox.pending) == 1
    assert receiver.received == []
