"""The protocol engine of one upload session: requests, probes, retries, offsets
and the running crc32c of the bytes the server acknowledged.

Two ways of sending share it:

* *window* mode (chunks): bytes read but not yet acknowledged stay in memory
  (at most one chunk and a read-ahead piece) and go out as ``Content-Range``
  chunks starting at the acknowledged offset. Used with ``chunk_size``, for
  sources that cannot seek, and by the writer.
* *stream* mode (one request): a seekable source goes out in one ``PUT``; after
  a failure the rest goes as ``bytes N-(T-1)/T`` from the probed offset ``N``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
import google_crc32c

from app.client.errors import (
    ChecksumMismatch,
    OffsetError,
    SessionGone,
    UploadClientError,
    UploadPaused,
    UploadRefused,
)
from app.client.progress import (
    Completed,
    Event,
    Progress,
    ProgressCallback,
    RateMeter,
    Resumed,
    Retrying,
)
from app.client.retry import Backoff, parse_retry_after
from app.client.source import Source
from app.client.state import SessionState

KIB = 1024
MIB = 1024 * KIB
CHUNK_ALIGN = 256 * KIB
DEFAULT_STREAM_CHUNK = 8 * MIB
PIECE = 256 * KIB
DEFAULT_STALL_TIMEOUT = 60.0

_T = TypeVar("_T")
_RANGE = re.compile(r"^bytes=0-(\d+)$")


def validate_chunk_size(chunk_size: int) -> int:
    if chunk_size <= 0 or chunk_size % CHUNK_ALIGN:
        raise ValueError(f"chunk_size must be a positive multiple of 256 KiB, not {chunk_size}")
    return chunk_size


def crc_b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def is_session_url(url: str) -> bool:
    """A GCS-style session URL (``upload_id`` in the query) is used as it is."""
    return "upload_id" in parse_qs(urlsplit(url).query)


def needs_initiation(url: str) -> bool:
    """Google's JSON API wants a POST first (``uploadType=resumable`` without a session)."""
    query = parse_qs(urlsplit(url).query)
    return query.get("uploadType") == ["resumable"] and "upload_id" not in query


class _Transient(Exception):
    """A failure worth a probe and another try."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def message(self) -> str:
        doc = self.json()
        if isinstance(doc, dict):
            err = doc.get("error")
            if isinstance(err, dict):  # Google's error shape
                return str(err.get("message", err))
            return str(doc.get("message") or err or doc)
        return self.body[:200].decode("utf-8", "replace") or f"HTTP {self.status}"


@dataclass
class Options:
    headers: dict[str, str]
    backoff: Backoff
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    connect_timeout: float = 30.0
    content_type: str | None = None
    on_progress: ProgressCallback | None = None
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    uniform: Callable[[float, float], float] = random.uniform
    clock: Callable[[], float] = time.monotonic


class Engine:
    """One upload session. Not for concurrent use: one request at a time."""

    def __init__(self, http: aiohttp.ClientSession, url: str, options: Options, *,
                 source: Source | None, chunk_size: int | None, total: int | None,
                 state: SessionState | None = None) -> None:
        self.http = http
        self.url = url
        self.opts = options
        self.source = source
        self.window_mode = chunk_size is not None
        self.chunk_size = chunk_size
        self.total = total
        self.acked = 0
        self.crc = 0
        # Highest byte position ever handed to a connection: a server claiming
        # more than this is not describing our bytes.
        self.sent_high = 0
        self.sent_total = 0
        self.started = False
        self.need_probe = False
        self._buf = bytearray()
        self._eof = False
        self._stream_pos = 0
        self._stream_crc = 0
        self._started_at = options.clock()
        self._meter = RateMeter()
        self._pause = asyncio.Event()
        if state is not None:
            self.acked = state.offset
            self.sent_high = max(state.offset, state.sent or 0)
            self.crc = state.crc32c
            self.started = state.started
            self.total = state.total if state.total is not None else total
            self.need_probe = True

    # --- public surface used by upload(), the writer and the CLI ---

    def state(self) -> SessionState:
        return SessionState(url=self.url, offset=self.acked, total=self.total,
                            chunk_size=self.chunk_size, crc32c=self.crc, started=self.started,
                            sent=self.sent_high)

    def request_pause(self) -> None:
        self._pause.set()

    @property
    def pause_requested(self) -> bool:
        return self._pause.is_set()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def end_of_data(self) -> None:
        self._eof = True
        self._fix_total(self.acked + len(self._buf))

    @property
    def buffered(self) -> int:
        return len(self._buf)

    async def initiate(self) -> None:
        """POST for a session URL (GCS style); ``Location`` becomes the URL."""
        headers = dict(self.opts.headers)
        if self.total is not None:
            headers["X-Upload-Content-Length"] = str(self.total)
        if self.opts.content_type:
            headers["X-Upload-Content-Type"] = self.opts.content_type

        async def attempt() -> _Answer:
            answer = await self._request("POST", self.url, headers, None)
            if answer.status in (200, 201) and answer.headers.get("Location"):
                return answer
            self._raise_for(answer)
            raise UploadClientError(f"initiation answered {answer.status} without a Location")

        answer = await self._retrying(attempt)
        self.url = answer.headers["Location"]
        self.started = True

    async def run(self) -> dict[str, Any]:
        """Send until the server reports the object complete; raises ``UploadPaused``
        with a state checked by a probe."""
        try:
            while True:
                result = await self.step(final=True)
                if result is not None:
                    return result
        except UploadPaused:
            raise UploadPaused(await self.pause_state()) from None

    async def step(self, *, final: bool) -> dict[str, Any] | None:
        """One request (after a probe when one is due), with retries. In window
        mode without ``final`` only a full chunk is sent."""

        async def attempt() -> dict[str, Any] | None:
            if self.need_probe:
                done = await self.probe()
                if done is not None:
                    return done
            if self.pause_requested:
                raise UploadPaused(self.state())
            return await (self._send_chunk(final) if self.window_mode else self._send_stream())

        return await self._retrying(attempt)

    async def probe(self) -> dict[str, Any] | None:
        """Ask the server for its offset and continue from it."""
        total = "*" if self.total is None or self.total > self.sent_high else str(self.total)
        headers = {**self.opts.headers, "Content-Range": f"bytes */{total}"}
        answer = await self._request("PUT", self.url, headers, None)
        if answer.status in (404, 410) and not self.started:
            # Nothing of ours ever reached the server: start from byte 0.
            offset = 0
        else:
            done = await self._handle(answer)
            if done is not None:
                self.need_probe = False
                return done
            assert answer.status == 308
            offset = self._offset_of(answer)
            self.started = True
        await self._advance(offset)
        self.need_probe = False
        self._emit(Resumed(offset))
        return None

    async def pause_state(self) -> SessionState:
        """The state to save: after a probe if the last request's fate is unknown."""
        self._pause.clear()
        if self.need_probe:
            async def attempt() -> dict[str, Any] | None:
                return await self.probe()
            await self._retrying(attempt)
        return self.state()

    # --- retries ---

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        # Each call starts with the whole budget, and so does any failure after
        # new bytes were acknowledged: the budget is for failures in a row.
        policy = self.opts.backoff
        while True:
            acked = self.acked
            try:
                return await attempt()
            except _Transient as exc:
                if self.acked > acked:
                    policy = self.opts.backoff
                policy = policy.increment(exc.reason)
                delay = policy.delay(self.opts.uniform, exc.retry_after)
                self._emit(Retrying(policy.attempt, delay, exc.reason, self.acked))
                self.need_probe = True
                await self._backoff_sleep(delay)

    async def _backoff_sleep(self, delay: float) -> None:
        # A pause cuts the wait short: the probe that follows needs no backoff.
        if self.pause_requested:
            return
        sleeping = asyncio.ensure_future(self.opts.sleep(delay))
        pausing = asyncio.ensure_future(self._pause.wait())
        try:
            await asyncio.wait({sleeping, pausing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeping, pausing):
                task.cancel()
            await asyncio.gather(sleeping, pausing, return_exceptions=True)

    # --- requests ---

    async def _request(self, method: str, url: str, headers: dict[str, str],
                       body: AsyncIterator[bytes] | None) -> _Answer:
        loop = asyncio.get_running_loop()
        stall = self.opts.stall_timeout
        try:
            async with asyncio.timeout(stall) as deadline:
                def alive() -> None:
                    deadline.reschedule(loop.time() + stall)

                data = _watched(body, alive) if body is not None else None
                if body is None and method == "PUT":
                    headers = {**headers, "Content-Length": "0"}
                async with self.http.request(method, url, headers=headers, data=data,
                                             allow_redirects=False) as resp:
                    payload = await resp.read()
                    return _Answer(resp.status, dict(resp.headers), payload)
        except TimeoutError as exc:
            raise _Transient(f"no progress for {stall:g}s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}" if str(exc)
                             else type(exc).__name__) from exc

    def _raise_for(self, answer: _Answer) -> None:
        status = answer.status
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}: {answer.message()}",
                             parse_retry_after(answer.headers.get("Retry-After")))
        if status in (404, 410):
            raise SessionGone(f"the server has no upload at {self.url} ({status}): "
                              f"{answer.message()}; it was cancelled or expired")
        raise UploadRefused(status, answer.message(), answer.json())

    def _offset_of(self, answer: _Answer) -> int:
        rng = answer.headers.get("Range")
        if rng is None:
            offset = 0
        else:
            match = _RANGE.match(rng.strip())
            if match is None:
                raise UploadClientError(f"cannot read the server's Range header {rng!r}")
            offset = int(match.group(1)) + 1
        if offset > self.sent_high:
            raise OffsetError(
                f"the server reports {offset} bytes stored but this client sent only "
                f"{self.sent_high}; refusing to continue (another writer or a broken server)")
        if offset < self.acked:
            raise OffsetError(
                f"the server reports {offset} bytes stored after acknowledging {self.acked}; "
                "acknowledged bytes were lost, refusing to continue")
        return offset

    async def _handle(self, answer: _Answer) -> dict[str, Any] | None:
        """Interpret an answer: the result on completion, None on 308."""
        if answer.status in (200, 201):
            return await self._complete(answer)
        if answer.status == 308:
            return None
        if answer.status == 409 and "Range" in answer.headers:
            # We started past the server's offset, so it holds less than it acknowledged.
            self._offset_of(answer)
        if answer.status in (404, 410) and not self.started:
            raise _Transient(f"HTTP {answer.status} before the upload was created")
        self._raise_for(answer)
        raise AssertionError("unreachable")

    async def _complete(self, answer: _Answer) -> dict[str, Any]:
        result = answer.json()
        if not isinstance(result, dict):
            raise UploadClientError(
                f"completion answer is not a JSON object: {answer.body[:200]!r}")
        size = result.get("size")
        try:
            size_value = int(size) if size is not None else None
        except (TypeError, ValueError):
            size_value = None
        end = size_value if size_value is not None else self.sent_high
        if end > self.sent_high or (self.total is not None and end != self.total):
            of = self.total if self.total is not None else "?"
            raise OffsetError(f"the server completed an object of {size} bytes; this client "
                              f"sent {self.sent_high} of {of}")
        await self._advance(end)
        self.started = True
        reported = result.get("crc32c")
        expected = crc_b64(self.crc)
        if reported is not None and reported != expected:
            raise ChecksumMismatch(
                f"the server's crc32c {reported} differs from {expected} of the bytes sent; "
                "the stored object is not the source", expected, str(reported), result)
        self._emit(Completed(result, end, self.sent_total, self.opts.clock() - self._started_at))
        return result

    # --- window mode ---

    def _fix_total(self, total: int) -> None:
        if self.total is not None and self.total != total:
            raise UploadClientError(
                f"the source ended at {total} bytes, not the {self.total} stated")
        self.total = total

    async def _fill(self, want: int) -> None:
        while self.source is not None and not self._eof and len(self._buf) < want:
            piece = await self.source.read(max(want - len(self._buf), PIECE))
            if not piece:
                self.end_of_data()
            else:
                self._buf += piece

    async def _advance(self, offset: int) -> None:
        """Move the acknowledged offset forward, extending the crc with the bytes it passes."""
        if offset <= self.acked:
            return
        if self.window_mode:
            await self._fill(offset - self.acked)
            take = offset - self.acked
            if take > len(self._buf):
                raise OffsetError(f"the server holds {offset} bytes but the source has only "
                                  f"{self.acked + len(self._buf)}")
            self.crc = google_crc32c.extend(self.crc, bytes(self._buf[:take]))
            del self._buf[:take]
        elif self._stream_pos == offset:
            self.crc = self._stream_crc
        else:
            # The cut request's bytes up to the new offset: read them again for the crc.
            assert self.source is not None
            await self.source.seek(self.acked)
            crc, left = self.crc, offset - self.acked
            while left:
                piece = await self.source.read(min(left, 4 * MIB))
                if not piece:
                    raise OffsetError(f"the server holds {offset} bytes, the source has fewer")
                crc = google_crc32c.extend(crc, piece)
                left -= len(piece)
            self.crc = crc
        self.acked = offset

    async def _send_chunk(self, final: bool) -> dict[str, Any] | None:
        assert self.chunk_size is not None
        await self._fill(self.chunk_size + 1)
        size = min(self.chunk_size, len(self._buf))
        last = self._eof and size == len(self._buf)
        if not last and not final and len(self._buf) <= self.chunk_size:
            return None  # the writer has no full chunk yet
        start = self.acked
        total = str(self.total) if self.total is not None else "*"
        if size == 0:
            if start == 0 and not self.started:
                return await self._plain_empty()
            # Everything is stored and the total is now known: a probe that states it.
            headers = {**self.opts.headers, "Content-Range": f"bytes */{total}"}
            answer = await self._request("PUT", self.url, headers, None)
            return await self._after_data(answer)
        chunk = bytes(self._buf[:size])
        headers = {**self.opts.headers,
                   "Content-Range": f"bytes {start}-{start + size - 1}/{total}",
                   "Content-Length": str(size)}
        if self.opts.content_type and start == 0:
            headers["Content-Type"] = self.opts.content_type
        answer = await self._request("PUT", self.url, headers, self._body_of(chunk, start))
        return await self._after_data(answer)

    async def _after_data(self, answer: _Answer) -> dict[str, Any] | None:
        done = await self._handle(answer)
        if done is None:
            self.started = True
            await self._advance(self._offset_of(answer))
        return done

    async def _plain_empty(self) -> dict[str, Any]:
        headers = dict(self.opts.headers)
        if self.opts.content_type:
            headers["Content-Type"] = self.opts.content_type
        answer = await self._request("PUT", self.url, headers, None)
        done = await self._handle(answer)
        if done is None:
            raise UploadClientError("the server did not complete an empty upload")
        return done

    async def _body_of(self, chunk: bytes, start: int) -> AsyncIterator[bytes]:
        view = memoryview(chunk)
        for i in range(0, len(view), PIECE):
            piece = view[i:i + PIECE]
            # Counted before the connection takes it: a cut can land it at the
            # server before this generator runs again.
            self._sent(start + i + len(piece), len(piece))
            yield piece.tobytes()

    def _sent(self, position: int, n: int) -> None:
        self.sent_total += n
        self.sent_high = max(self.sent_high, position)
        now = self.opts.clock()
        rate = self._meter.add(now, position)
        eta = None
        if self.total is not None and rate > 0:
            eta = (self.total - position) / rate
        self._emit(Progress(self.acked, self.sent_total, position, self.total, rate, eta,
                            now - self._started_at))

    # --- stream mode ---

    async def _send_stream(self) -> dict[str, Any] | None:
        assert self.source is not None and self.total is not None
        start, total = self.acked, self.total
        if total == 0:
            return await self._plain_empty()
        if start == total:
            # All stored but not completed (a 308 for the last byte): finalize.
            headers = {**self.opts.headers, "Content-Range": f"bytes */{total}"}
            return await self._after_data(await self._request("PUT", self.url, headers, None))
        headers = dict(self.opts.headers)
        headers["Content-Length"] = str(total - start)
        if start == 0 and not self.started:
            # A plain PUT: also replaces a stale unfinished upload of the same name.
            if self.opts.content_type:
                headers["Content-Type"] = self.opts.content_type
        else:
            headers["Content-Range"] = f"bytes {start}-{total - 1}/{total}"
        await self.source.seek(start)
        self._stream_pos, self._stream_crc = start, self.crc
        request = asyncio.ensure_future(
            self._request("PUT", self.url, headers, self._stream_body(start, total)))
        pause = asyncio.ensure_future(self._pause.wait())
        try:
            await asyncio.wait({request, pause}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pause.cancel()
        if not request.done():
            # Paused mid-body: drop the request; the probe that follows learns
            # what arrived (and makes the server let go of it).
            request.cancel()
            try:
                await request
            except (asyncio.CancelledError, _Transient):
                pass
            self.need_probe = True
            raise UploadPaused(self.state())
        return await self._after_data(request.result())

    async def _stream_body(self, start: int, total: int) -> AsyncIterator[bytes]:
        assert self.source is not None
        position = start
        while position < total:
            piece = await self.source.read(min(PIECE, total - position))
            if not piece:
                raise UploadClientError(f"the source ended at {position} bytes, not {total}")
            self._stream_crc = google_crc32c.extend(self._stream_crc, piece)
            self._stream_pos = position + len(piece)
            position += len(piece)
            self._sent(position, len(piece))
            yield piece

    def _emit(self, event: Event) -> None:
        if self.opts.on_progress is not None:
            self.opts.on_progress(event)


async def _watched(body: AsyncIterator[bytes], alive: Callable[[], None]) -> AsyncIterator[bytes]:
    """Pass the body on, pushing the stall deadline back whenever the connection
    takes another piece (aiohttp pulls the next one only after the last was written)."""
    async for piece in body:
        alive()
        yield piece
    alive()
