"""Completion callbacks: signed POSTs to the main application, delivered at least once.

When an upload completes, ``CompletionNotifier.notify`` writes the callback to
the store's ``CallbackOutbox`` *before* the client gets its 200, then delivers
it in the background, so a slow or down receiver never delays uploads and a
crash never loses a callback: whatever is still pending is sent again by
``redeliver_pending`` (at start-up and from the cleanup job).

Every attempt is a ``POST {callbacks.on_complete_url}`` with the JSON body and::

    Content-Type: application/json
    X-Upload-Callback-Id: <32 hex chars, the same on every attempt and redelivery>
    X-Upload-Timestamp: <unix seconds of this attempt>
    X-Upload-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

At least once means duplicates happen (a 2xx lost on the way back, a crash
between delivery and deleting the pending entry): receivers de-duplicate on
``X-Upload-Callback-Id``. They check the signature with ``verify``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from app.config import CallbacksConfig
from app.stores.base import CallbackOutbox

logger = logging.getLogger("app.callbacks")

CALLBACK_ID_HEADER = "X-Upload-Callback-Id"
TIMESTAMP_HEADER = "X-Upload-Timestamp"
SIGNATURE_HEADER = "X-Upload-Signature"
SIGNATURE_PREFIX = "sha256="

_TIMESTAMP = re.compile(r"[0-9]{1,15}")

#: Ceiling for one retry delay, so a large ``max_attempts`` cannot park a
#: delivery for hours inside one process.
MAX_BACKOFF = 60.0
#: Pending callbacks sent at once by ``redeliver_pending``: enough to drain a
#: backlog, few enough not to flood a receiver that has just come back.
REDELIVERY_CONCURRENCY = 8


class CompletionNotifier:
    def __init__(
        self,
        config: CallbacksConfig,
        outbox: CallbackOutbox | None,
        session: aiohttp.ClientSession,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        recorded: Callable[[], Awaitable[list[tuple[str, bytes, str]]]] | None = None,
        on_delivered: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        """``recorded`` lists callbacks whose intent the store keeps in session
        records (``notify_pending``) rather than in the outbox, as (id, body,
        the record's name); ``on_delivered(id, record name)`` confirms one
        there after its 2xx."""
        self._config = config
        self._outbox = outbox
        self._session = session
        self._sleep = sleep
        self._rng = rng
        self._recorded = recorded
        self._on_delivered = on_delivered
        #: Callback id -> the session record that keeps its intent (an id
        #: session's record is not named like the object the payload names).
        self._record_of: dict[str, str] = {}
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        #: False when no receiver is configured; ``notify`` then does nothing.
        self.enabled = bool(config.on_complete_url)
        # Outcome counts, read by the metrics endpoint.
        self.delivered = 0
        self.failed_attempts = 0
        self.given_up = 0
        self._url = config.on_complete_url or ""
        self._log_url = str(URL(self._url).with_user(None)) if self._url else ""
        self._secret = config.secret or ""
        if self.enabled and not self._secret:
            raise ValueError("callbacks.secret is required with callbacks.on_complete_url")
        # Strong references: the event loop keeps only weak ones to tasks.
        self._tasks: set[asyncio.Task[bool]] = set()
        # Ids being sent by this instance, so a concurrent redelivery skips them.
        self._in_flight: set[str] = set()
        self._closing = False
        if self.enabled and outbox is None:
            logger.warning(
                "the store cannot keep pending callbacks: completion callbacks to %s are "
                "best-effort and lost if the process stops before delivery",
                self._log_url,
            )

    async def notify(
        self,
        payload: Mapping[str, Any],
        *,
        callback_id: str | None = None,
        recorded: bool = False,
        record: str | None = None,
    ) -> None:
        """Record the callback durably, start delivering it, and return.

        ``recorded``: the store already keeps the intent in the session record
        (``notify_pending``) of the session ``record``, so nothing is written
        here, and delivery confirms it there. Otherwise the callback
        goes to the outbox first, and whatever ``save_pending`` raises
        (``StorageUnavailable``) is raised, so the caller does not acknowledge
        a completion whose callback could be lost.
        ``callback_id`` defaults to a fresh uuid4; a caller that may notify the
        same completion twice can pass a stable one so receivers see a duplicate.
        A callback this instance is delivering already is not started again.
        """
        if not self.enabled:
            return
        body = encode(payload)
        callback_id = callback_id or uuid.uuid4().hex
        if recorded and record is not None:
            self._record_of[callback_id] = record
        if not recorded and self._outbox is not None:
            await self._outbox.save_pending(callback_id, body)
        if callback_id in self._in_flight:
            return
        if self._closing:
            # Shutting down: with an outbox it is durable and the next start-up
            # delivers it; without one there is nothing left to send it.
            if self._outbox is None:
                logger.warning("callback %s not sent: shutting down", callback_id)
            return
        # Marked before the task first runs, so a redelivery starting meanwhile
        # skips it; unmarked by a done callback, which runs even if the task is
        # cancelled before it ever started.
        self._in_flight.add(callback_id)
        task = asyncio.create_task(
            # Confirmed in the record only when the record is where it was
            # kept: an outbox entry saved because the record is about to be
            # replaced must not race that replacement with a record write.
            self._deliver_tracked(callback_id, body, in_outbox=not recorded, confirm=recorded)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._in_flight.discard(callback_id))

    async def deliver(
        self, callback_id: str, body: bytes, *, in_outbox: bool = True, confirm: bool = True
    ) -> bool:
        """POST until a 2xx or ``max_attempts``; True once delivered and removed
        from the outbox (``in_outbox``) and confirmed to the store, False when
        it stays pending for a later redelivery."""
        reason = ""
        for attempt in range(1, self._config.max_attempts + 1):
            reason = await self._attempt(callback_id, body)
            if not reason:
                self.delivered += 1
                await self._forget(callback_id, body, in_outbox=in_outbox, confirm=confirm)
                logger.info(
                    "callback %s delivered on attempt %d", callback_id, attempt
                )
                return True
            self.failed_attempts += 1
            if attempt < self._config.max_attempts:
                delay = self._backoff(attempt)
                logger.info(
                    "callback %s attempt %d/%d failed (%s); retrying in %.1fs",
                    callback_id, attempt, self._config.max_attempts, reason, delay,
                )
                await self._sleep(delay)
        self.given_up += 1
        logger.warning(
            "callback %s to %s not delivered after %d attempts (last: %s); %s",
            callback_id, self._log_url, self._config.max_attempts, reason,
            "it stays pending for redelivery" if self._outbox is not None else "it is dropped",
        )
        return False

    async def redeliver_pending(self) -> tuple[int, int]:
        """Send every callback left in the outbox; returns (delivered, still pending).

        Callbacks this instance is already sending are left to that delivery and
        counted as pending. Raises whatever ``list_pending`` raises.
        """
        if self._outbox is None and self._recorded is None:
            return 0, 0
        pending = [] if self._outbox is None else await self._outbox.list_pending()
        in_outbox = {callback_id for callback_id, _ in pending}
        if self._recorded is not None:
            # Completions whose intent only the session record holds (the
            # outbox is not written for them); an id in both is sent once.
            for callback_id, body, record in await self._recorded():
                self._record_of[callback_id] = record
                if callback_id not in in_outbox:
                    pending.append((callback_id, body))
        if not self.enabled:
            if pending:
                logger.warning(
                    "%d completion callbacks are pending but callbacks.on_complete_url "
                    "is unset; they are kept", len(pending),
                )
            return 0, len(pending)
        busy = sum(1 for callback_id, _ in pending if callback_id in self._in_flight)
        todo = [(cid, body) for cid, body in pending if cid not in self._in_flight]
        semaphore = asyncio.Semaphore(REDELIVERY_CONCURRENCY)

        async def one(callback_id: str, body: bytes) -> bool:
            async with semaphore:
                if callback_id in self._in_flight:
                    return False
                return await self._deliver_tracked(
                    callback_id, body, in_outbox=callback_id in in_outbox
                )

        results = await asyncio.gather(*(one(cid, body) for cid, body in todo))
        delivered = sum(results)
        still_pending = len(todo) - delivered + busy
        if pending:
            logger.info(
                "redelivered %d pending callbacks, %d still pending", delivered, still_pending
            )
        return delivered, still_pending

    # The grace period is the point: past it deliveries are cancelled, not the caller.
    async def close(self, timeout: float) -> None:  # noqa: ASYNC109
        """Let in-flight deliveries finish for up to ``timeout`` seconds, then
        cancel the rest; cancelled ones stay in the outbox."""
        self._closing = True
        tasks = set(self._tasks)
        if not tasks:
            return
        _, unfinished = await asyncio.wait(tasks, timeout=max(timeout, 0))
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.gather(*unfinished, return_exceptions=True)
            logger.warning(
                "%d completion callbacks were still being delivered at shutdown; %s",
                len(unfinished),
                "they stay pending" if self._outbox is not None else "they are lost",
            )

    async def _deliver_tracked(
        self, callback_id: str, body: bytes, *, in_outbox: bool, confirm: bool = True
    ) -> bool:
        self._in_flight.add(callback_id)
        try:
            return await self.deliver(callback_id, body, in_outbox=in_outbox, confirm=confirm)
        except Exception:
            # A bug or an outbox failure must not vanish inside a background task.
            logger.exception("callback %s delivery failed unexpectedly", callback_id)
            return False
        finally:
            self._in_flight.discard(callback_id)

    async def _attempt(self, callback_id: str, body: bytes) -> str:
        """One POST; returns "" on success, else why it failed."""
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            CALLBACK_ID_HEADER: callback_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: SIGNATURE_PREFIX + sign(self._secret, timestamp, body),
        }
        try:
            # No redirects: a POST turned into a GET elsewhere is not a delivery.
            async with self._session.post(
                self._url, data=body, headers=headers, timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return ""
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {self._config.timeout:g}s"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _forget(
        self, callback_id: str, body: bytes, *, in_outbox: bool, confirm: bool
    ) -> None:
        try:
            record = self._record_of.pop(callback_id, None) if confirm else None
            if record is not None and self._on_delivered is not None:
                await self._on_delivered(callback_id, record)
            if in_outbox and self._outbox is not None:
                await self._outbox.delete_pending(callback_id)
        except Exception as exc:
            # Delivered already; the worst outcome is a duplicate the receiver drops.
            logger.warning(
                "callback %s delivered but not removed from the outbox (%s); "
                "it may be delivered again", callback_id, exc,
            )

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads the retries of many callbacks that failed together.
        ceiling = min(MAX_BACKOFF, self._config.backoff * 2 ** (attempt - 1))
        return self._rng() * ceiling


def encode(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes stored, signed and sent: the same payload always gives
    the same bytes, so a callback rebuilt from a session record is identical
    to the first attempt."""
    return json.dumps(payload, separators=(",", ":"), default=_jsonable).encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>." + body``; binding the timestamp stops replays."""
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    timestamp_header: str,
    signature_header: str,
    body: bytes,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """Check a callback's ``X-Upload-Timestamp`` and ``X-Upload-Signature``
    against the raw body, rejecting timestamps more than ``tolerance`` seconds
    from ``now`` (either way) so a captured request cannot be replayed later."""
    # Digits only: int() would also take "+1", " 1" or "1_0", which a receiver
    # written in another language would sign differently.
    if not isinstance(timestamp_header, str) or not _TIMESTAMP.fullmatch(timestamp_header):
        return False
    timestamp = int(timestamp_header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    signature = signature_header.strip() if isinstance(signature_header, str) else ""
    if not signature.startswith(SIGNATURE_PREFIX):
        return False
    expected = SIGNATURE_PREFIX + sign(secret, timestamp, body)
    # Constant time, so the signature cannot be guessed byte by byte from timings.
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


def _jsonable(value: Any) -> Any:
    # Metadata often arrives as a read-only Mapping, which json cannot encode.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
