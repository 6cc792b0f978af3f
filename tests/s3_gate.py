"""An HTTP proxy in front of moto that tests steer: ``S3Gate``.

* Conditional writes (requests carrying ``If-Match``/``If-None-Match``) are
  forwarded one at a time: moto checks the condition and then writes, without
  a lock, so two concurrent conditional PUTs could both win. Real S3 is atomic
  here; serialising them restores that.
* Each ``listener`` is a port of its own with a tag, so requests of two server
  processes can be told apart.
* ``hold`` keeps matching requests until the test releases them (an
  interleaving made by events, never by sleeps); ``answer`` replies with an S3
  error document instead of forwarding.
* Every request is logged (tag, method, path, query, body bytes, when its
  head arrived, the status it got); ``watch`` sets an event once matching
  requests have been answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "expect",
                  "te", "trailer", "upgrade", "proxy-connection"})


@dataclass
class Seen:
    tag: str
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    size: int
    #: ``time.monotonic()`` when the request's head arrived, before its body
    #: was read: a request a frozen process had begun sending counts as begun.
    at: float = 0.0
    #: The status the gate answered with; None until then.
    status: int | None = None

    @property
    def conditional(self) -> bool:
        return "If-Match" in self.headers or "If-None-Match" in self.headers

    def is_upload_part(self) -> bool:
        return self.method == "PUT" and "partNumber" in self.query and "uploadId" in self.query


Match = Callable[[Seen], bool]


@dataclass
class Hold:
    """Holds the requests that ``match`` until ``release()``; ``arrived`` is
    set once one is being held, ``forwarded`` once one got its answer."""

    match: Match
    count: int = 1
    released: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    forwarded: asyncio.Event = field(default_factory=asyncio.Event)
    taken: int = 0

    def release(self) -> None:
        self.released.set()


@dataclass
class Watch:
    """``done`` is set once ``count`` requests that ``match`` have been answered."""

    match: Match
    count: int = 1
    done: asyncio.Event = field(default_factory=asyncio.Event)
    answered: list[Seen] = field(default_factory=list)


@dataclass
class Answer:
    match: Match
    status: int
    code: str
    message: str
    count: int = 1_000_000
    taken: int = 0


class S3Gate:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.log: list[Seen] = []
        self._holds: list[Hold] = []
        self._answers: list[Answer] = []
        self._watches: list[Watch] = []
        self._conditional = asyncio.Lock()
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None

    async def listener(self, tag: str) -> str:
        """A new port whose requests carry ``tag``; its URL."""
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handler(tag))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    def hold(self, match: Match, count: int = 1) -> Hold:
        hold = Hold(match, count)
        self._holds.append(hold)
        return hold

    def watch(self, match: Match, count: int = 1) -> Watch:
        watch = Watch(match, count)
        self._watches.append(watch)
        return watch

    def answer(self, match: Match, status: int, code: str, message: str = "refused",
               count: int = 1_000_000) -> Answer:
        answer = Answer(match, status, code, message, count)
        self._answers.append(answer)
        return answer

    def clear(self) -> None:
        for hold in self._holds:
            hold.release()
        self._holds.clear()
        self._answers.clear()
        self._watches.clear()

    def seen(self, tag: str | None = None) -> list[Seen]:
        return [s for s in self.log if tag is None or s.tag == tag]

    async def close(self) -> None:
        self.clear()
        for runner in self._runners:
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _handler(self, tag: str) -> Callable[[web.Request], object]:
        async def handle(request: web.Request) -> web.StreamResponse:
            arrived = time.monotonic()
            body = await request.read()
            seen = Seen(tag, request.method, request.path, dict(request.query),
                        CIMultiDict(request.headers), len(body), arrived)
            self.log.append(seen)
            response = await self._dispatch(request, body, seen)
            seen.status = response.status
            for watch in self._watches:
                if not watch.done.is_set() and watch.match(seen):
                    watch.answered.append(seen)
                    if len(watch.answered) >= watch.count:
                        watch.done.set()
            return response

        return handle

    async def _dispatch(self, request: web.Request, body: bytes,
                        seen: Seen) -> web.StreamResponse:
        for answer in self._answers:
            if answer.taken < answer.count and answer.match(seen):
                answer.taken += 1
                return _error_document(answer)
        hold = next((h for h in self._holds if h.taken < h.count and h.match(seen)), None)
        if hold is not None:
            hold.taken += 1
            hold.arrived.set()
            await hold.released.wait()
        try:
            if seen.conditional:
                async with self._conditional:
                    return await self._forward(request, body)
            return await self._forward(request, body)
        finally:
            if hold is not None:
                hold.forwarded.set()

    async def _forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = f"{self.upstream}{request.path_qs}"
        async with self._session.request(request.method, url, headers=headers, data=body,
                                         allow_redirects=False) as upstream:
            data = await upstream.read()
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP:
                    response.headers.add(key, value)
            length = upstream.headers.get("Content-Length")
            response.content_length = int(length) if length is not None else len(data)
            await response.prepare(request)
            if request.method != "HEAD":
                await response.write(data)
            await response.write_eof()
            return response


def _error_document(answer: Answer) -> web.Response:
    xml = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>"
           f"<Code>{answer.code}</Code><Message>{answer.message}</Message>"
           "<RequestId>gate</RequestId></Error>")
    return web.Response(status=answer.status, text=xml, content_type="application/xml")
