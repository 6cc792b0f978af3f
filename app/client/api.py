"""The public client: ``upload()``, ``resume()``, ``Uploader`` (pausable) and
``ResumableWriter``, plus blocking wrappers for scripts."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import aiohttp

from app.client.core import (
    DEFAULT_STALL_TIMEOUT,
    DEFAULT_STREAM_CHUNK,
    Engine,
    Options,
    is_session_url,
    needs_initiation,
    validate_chunk_size,
)
from app.client.errors import UploadClientError
from app.client.progress import Event, ProgressCallback
from app.client.retry import Backoff
from app.client.source import Source, SourceLike, open_source
from app.client.state import SessionState

Sleep = Callable[[float], Awaitable[Any]]


def _backoff(retries: int, backoff: float | Backoff) -> Backoff:
    if isinstance(backoff, Backoff):
        return backoff
    return Backoff(retries=retries, base=float(backoff))


class _Base:
    """What the uploader and the writer share: options and the HTTP session."""

    def __init__(self, *, headers: Mapping[str, str] | None, content_type: str | None,
                 on_progress: ProgressCallback | None, retries: int, backoff: float | Backoff,
                 stall_timeout: float, session: aiohttp.ClientSession | None, sleep: Sleep,
                 uniform: Callable[[float, float], float], clock: Callable[[], float]) -> None:
        self._options = Options(
            headers=dict(headers or {}), backoff=_backoff(retries, backoff),
            stall_timeout=stall_timeout, content_type=content_type, on_progress=on_progress,
            sleep=sleep, uniform=uniform, clock=clock,
        )
        self._session = session

    def _http(self) -> tuple[aiohttp.ClientSession, bool]:
        if self._session is not None:
            return self._session, False
        # No total or read timeout: a big upload takes as long as it takes; the
        # engine's stall timeout catches a connection that stopped moving.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._options.connect_timeout)
        return aiohttp.ClientSession(timeout=timeout, auto_decompress=False), True


class Uploader(_Base):
    """One upload of ``source`` to ``url``. ``await run()`` returns the object
    JSON; after ``pause()`` it raises ``UploadPaused`` carrying the state that
    ``resume()`` continues from, in this process or another."""

    def __init__(self, url: str, source: SourceLike | Source, *, chunk_size: int | None = None,
                 total: int | None = None, headers: Mapping[str, str] | None = None,
                 content_type: str | None = None, on_progress: ProgressCallback | None = None,
                 retries: int = 8, backoff: float | Backoff = 0.5,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT, initiate: bool | None = None,
                 session: aiohttp.ClientSession | None = None, sleep: Sleep = asyncio.sleep,
                 uniform: Callable[[float, float], float] = random.uniform,
                 clock: Callable[[], float] = time.monotonic,
                 state: SessionState | None = None) -> None:
        super().__init__(headers=headers, content_type=content_type, on_progress=on_progress,
                         retries=retries, backoff=backoff, stall_timeout=stall_timeout,
                         session=session, sleep=sleep, uniform=uniform, clock=clock)
        if chunk_size is not None:
            validate_chunk_size(chunk_size)
        self.url = url
        self._source_like = source
        self._chunk_size = chunk_size
        self._total = total
        self._initiate = initiate
        self._state = state
        self._engine: Engine | None = None
        self._pause_early = False

    def pause(self) -> None:
        """Ask for a pause: with chunks after the one in flight is answered, in
        one-request mode at once (a probe then learns what arrived)."""
        if self._engine is None:
            self._pause_early = True
        else:
            self._engine.request_pause()

    @property
    def engine(self) -> Engine | None:
        return self._engine

    async def run(self) -> dict[str, Any]:
        source = open_source(self._source_like)
        http, owned = self._http()
        try:
            return await self._run(source, http)
        finally:
            await source.close()
            if owned:
                await http.close()

    async def _run(self, source: Source, http: aiohttp.ClientSession) -> dict[str, Any]:
        total = self._total
        if source.total is not None:
            if total is not None and total != source.total:
                raise UploadClientError(f"total={total} but the source has {source.total} bytes")
            total = source.total
        chunk = self._chunk_size
        state = self._state
        if state is not None:
            chunk = chunk or state.chunk_size
            if state.total is not None and total is not None and state.total != total:
                raise UploadClientError(
                    f"the saved upload is of {state.total} bytes, the source has {total}")
        if chunk is None and not source.seekable:
            # A source that cannot seek must keep what is unacknowledged in
            # memory, so it goes in chunks that the server acknowledges.
            chunk = DEFAULT_STREAM_CHUNK
        engine = Engine(http, state.url if state else self.url, self._options, source=source,
                        chunk_size=chunk, total=total, state=state)
        self._engine = engine
        if self._pause_early:
            engine.request_pause()
        if state is not None:
            if source.seekable:
                await source.seek(state.offset)
        else:
            initiate = self._initiate
            if initiate is None:
                initiate = needs_initiation(self.url) or (
                    chunk is not None and not is_session_url(self.url))
            if initiate:
                await engine.initiate()
        return await engine.run()


async def upload(url: str, source: SourceLike | Source, **kwargs: Any) -> dict[str, Any]:
    """Upload ``source`` (path, binary file, bytes or async iterator of bytes) to
    ``url`` and return the object JSON. Keywords as for ``Uploader``: ``chunk_size``
    (a multiple of 256 KiB; without it one request, resumed after failures),
    ``total``, ``headers``, ``content_type``, ``on_progress``, ``retries``,
    ``backoff``, ``stall_timeout``, ``initiate``, ``session``."""
    return await Uploader(url, source, **kwargs).run()


async def upload_events(url: str, source: SourceLike | Source,
                        **kwargs: Any) -> AsyncIterator[Event]:
    """``upload()`` as a stream of events, ending with ``Completed``; a failure
    is raised from the iterator after the events that led to it."""
    queue: asyncio.Queue[Event | None] = asyncio.Queue()
    callback = kwargs.pop("on_progress", None)

    def emit(event: Event) -> None:
        queue.put_nowait(event)
        if callback is not None:
            callback(event)

    task = asyncio.ensure_future(upload(url, source, on_progress=emit, **kwargs))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (event := await queue.get()) is not None:
            yield event
        task.result()
    finally:
        task.cancel()


async def resume(state: SessionState, source: SourceLike | Source,
                 **kwargs: Any) -> dict[str, Any]:
    """Continue a paused upload. A seekable ``source`` is the whole object (the
    client seeks to ``state.offset``); a stream must start at ``state.offset``."""
    return await Uploader(state.url, source, state=state, **kwargs).run()


class ResumableWriter(_Base):
    """``async with ResumableWriter(url) as w: await w.write(data)``; leaving the
    block without an error completes the upload (``w.result``). ``pause()``
    waits for the chunk in flight and returns the state; ``ResumableWriter(
    state.url, state=state)`` continues with the bytes from ``state.offset`` on."""

    def __init__(self, url: str, *, chunk_size: int = DEFAULT_STREAM_CHUNK,
                 total: int | None = None, headers: Mapping[str, str] | None = None,
                 content_type: str | None = None, on_progress: ProgressCallback | None = None,
                 retries: int = 8, backoff: float | Backoff = 0.5,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT, initiate: bool | None = None,
                 session: aiohttp.ClientSession | None = None, sleep: Sleep = asyncio.sleep,
                 uniform: Callable[[float, float], float] = random.uniform,
                 clock: Callable[[], float] = time.monotonic,
                 state: SessionState | None = None) -> None:
        super().__init__(headers=headers, content_type=content_type, on_progress=on_progress,
                         retries=retries, backoff=backoff, stall_timeout=stall_timeout,
                         session=session, sleep=sleep, uniform=uniform, clock=clock)
        if state is not None and state.chunk_size is not None:
            chunk_size = state.chunk_size
        self.chunk_size = validate_chunk_size(chunk_size)
        self.url = state.url if state is not None else url
        self._total = total
        self._state = state
        self._initiate = initiate
        self._lock = asyncio.Lock()
        self._engine: Engine | None = None
        self._http_session: aiohttp.ClientSession | None = None
        self._owned = False
        self._closed = False
        self.paused: SessionState | None = None
        self.result: dict[str, Any] | None = None

    async def __aenter__(self) -> ResumableWriter:
        self._http_session, self._owned = self._http()
        try:
            engine = Engine(self._http_session, self.url, self._options, source=None,
                            chunk_size=self.chunk_size, total=self._total, state=self._state)
            self._engine = engine
            if self._state is not None:
                await engine.step(final=False)  # the probe
            elif self._initiate is not False and not is_session_url(self.url):
                await engine.initiate()
        except BaseException:
            await self._release()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if exc_type is None and self.paused is None and not self._closed:
                await self.close()
        finally:
            await self._release()

    async def _release(self) -> None:
        if self._owned and self._http_session is not None:
            await self._http_session.close()
        self._http_session = None

    def _ready(self) -> Engine:
        if self._engine is None:
            raise UploadClientError("use the writer inside 'async with'")
        if self.paused is not None:
            raise UploadClientError("the writer is paused; resume with its state")
        if self._closed:
            raise UploadClientError("the writer is closed")
        return self._engine

    @property
    def acknowledged(self) -> int:
        return self._engine.acked if self._engine is not None else 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        async with self._lock:
            engine = self._ready()
            engine.feed(data)
            while engine.buffered > self.chunk_size:
                await engine.step(final=False)

    async def pause(self) -> SessionState:
        """Wait for the chunk in flight; the state covers what the server acknowledged.
        Bytes written since (less than a chunk) are not sent: resume from ``offset``."""
        async with self._lock:
            engine = self._ready()
            self.paused = await engine.pause_state()
            return self.paused

    async def close(self) -> dict[str, Any]:
        """Send the rest as the final chunk and return the object JSON."""
        async with self._lock:
            engine = self._ready()
            engine.end_of_data()
            result = None
            while result is None:
                result = await engine.step(final=True)
            self._closed = True
            self.result = result
            return result


def writer(url: str, **kwargs: Any) -> ResumableWriter:
    return ResumableWriter(url, **kwargs)


def upload_sync(url: str, source: SourceLike, **kwargs: Any) -> dict[str, Any]:
    """``upload()`` for scripts without an event loop."""
    return asyncio.run(upload(url, source, **kwargs))


def resume_sync(state: SessionState, source: SourceLike, **kwargs: Any) -> dict[str, Any]:
    return asyncio.run(resume(state, source, **kwargs))
