"""Things that sit between the client and the real server in tests.

``FaultRelay`` is an asyncio TCP relay that reads the HTTP it carries (request
heads, body lengths, response statuses and ``Range``) and acts at byte counts
of upload body forwarded to the server: it cuts the connection, or stalls it
(stops forwarding, keeps both sockets open), or calls a watcher (to send a
signal, say; forwarding waits for the awaitable it may return). Its log
shows what the client sent after each acknowledgement.

``StubProxy`` is an aiohttp app in front of the server that answers 503 a few
times, or lies about the crc32c or the offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web


@dataclass
class Req:
    conn: int
    method: str
    content_range: str | None
    length: int
    received: int = 0   # body bytes read from the client
    forwarded: int = 0  # body bytes passed to the server

    @property
    def start(self) -> int:
        if self.content_range is None:
            return 0
        match = re.match(r"bytes (\d+)-", self.content_range)
        return int(match.group(1)) if match else -1


@dataclass
class Resp:
    conn: int
    status: int
    range: str | None

    @property
    def offset(self) -> int | None:
        if self.status != 308:
            return None
        return 0 if self.range is None else int(self.range.rsplit("-", 1)[1]) + 1


def _head(raw: bytes) -> tuple[str, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


@dataclass
class FaultRelay:
    target_port: int
    faults: list[tuple[int, str]] = field(default_factory=list)
    watches: list[tuple[int, Callable[[], Awaitable[None] | None]]] = field(
        default_factory=list)
    log: list[Req | Resp] = field(default_factory=list)
    forwarded: int = 0
    received: int = 0
    acted: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.faults = sorted(self.faults)
        self.watches = sorted(self.watches, key=lambda w: w[0])
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._conns = 0
        self._stop = asyncio.Event()

        self.url = ""

    async def __aenter__(self) -> FaultRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        await self._server.wait_closed()

    def requests(self) -> list[Req]:
        return [e for e in self.log if isinstance(e, Req)]

    def check_no_resend_after_ack(self) -> None:
        """Every request's body starts at or after the highest offset the server
        had acknowledged (in any answer) before the request began."""
        acked = 0
        for event in self.log:
            if isinstance(event, Resp):
                if event.offset is not None:
                    acked = max(acked, event.offset)
            elif event.length:
                assert event.start >= acked, (event, acked)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn = self._conns
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cwriter.transport.abort()
            return
        self._writers += [cwriter, swriter]
        up = asyncio.ensure_future(self._upstream(conn, creader, swriter, cwriter))
        down = asyncio.ensure_future(self._downstream(conn, sreader, cwriter))
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if up.done() and up.result() == "stall":
            # Both sockets stay open and silent until the relay stops.
            await self._stop.wait()
        for task in (up, down):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await task
        for w in (cwriter, swriter):
            w.transport.abort()

    async def _upstream(self, conn: int, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, client: asyncio.StreamWriter) -> str:
        buf = b""
        req: Req | None = None
        remaining = 0
        while True:
            data = await reader.read(65536)
            if not data:
                writer.write_eof() if writer.can_write_eof() else None
                return "eof"
            buf += data
            while buf:
                if remaining == 0:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    line, headers = _head(buf[:end])
                    assert "chunked" not in headers.get("transfer-encoding", ""), headers
                    remaining = int(headers.get("content-length", "0"))
                    req = Req(conn, line.split(" ", 1)[0], headers.get("content-range"), remaining)
                    self.log.append(req)
                    writer.write(buf[:end + 4])
                    buf = buf[end + 4:]
                    continue
                assert req is not None
                body = buf[:remaining]
                req.received += len(body)
                self.received += len(body)
                if body and self.faults and self.forwarded + len(body) >= self.faults[0][0]:
                    at, action = self.faults.pop(0)
                    part = body[:max(0, at - self.forwarded)]
                    writer.write(part)
                    req.forwarded += len(part)
                    self.forwarded += len(part)
                    await writer.drain()
                    self.acted.append((self.forwarded, action))
                    if action == "stall":
                        return "stall"
                    client.transport.abort()
                    writer.transport.abort()
                    return "cut"
                writer.write(body)
                req.forwarded += len(body)
                self.forwarded += len(body)
                remaining -= len(body)
                buf = buf[len(body):]
                while self.watches and self.forwarded >= self.watches[0][0]:
                    held = self.watches.pop(0)[1]()
                    if held is not None:
                        # The watcher wants nothing more forwarded until it is done;
                        # shielded, as this connection may be torn down meanwhile.
                        await asyncio.shield(held)
            await writer.drain()

    async def _downstream(self, conn: int, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> str:
        buf = b""
        skip = 0
        while True:
            data = await reader.read(65536)
            if not data:
                return "eof"
            writer.write(data)
            buf += data
            while buf:
                if skip:
                    taken = min(skip, len(buf))
                    skip -= taken
                    buf = buf[taken:]
                    continue
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                line, headers = _head(buf[:end])
                self.log.append(Resp(conn, int(line.split(" ")[1]), headers.get("range")))
                skip = int(headers.get("content-length", "0"))
                buf = buf[end + 4:]
            await writer.drain()


class StubProxy:
    """Forwards to ``upstream``; the first ``fail_first`` requests, and all from
    the ``fail_from``-th on, get ``status`` + Retry-After (their bodies read and
    dropped); ``lie_crc`` rewrites the completion's crc32c; ``lie_offset`` adds
    bytes to every 308's Range."""

    def __init__(self, upstream: str, *, fail_first: int = 0, retry_after: str = "1",
                 status: int = 503, fail_from: int | None = None, lie_crc: bool = False,
                 lie_offset: int = 0) -> None:
        self.upstream = upstream
        self.fail_from = fail_from
        self.status = status
        self.fail_first = fail_first
        self.retry_after = retry_after
        self.lie_crc = lie_crc
        self.lie_offset = lie_offset
        self.seen: list[tuple[str, str | None, int]] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> StubProxy:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._http = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._http is not None and self._runner is not None
        await self._http.close()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        status_of_stub = None
        if self.fail_first > 0:
            self.fail_first -= 1
            status_of_stub = self.status
        if self.fail_from is not None and len(self.seen) + 1 >= self.fail_from:
            status_of_stub = self.status
        self.seen.append((request.method, request.headers.get("Content-Range"), len(body)))
        if status_of_stub:
            return web.json_response({"error": "unavailable", "message": "try later"},
                                     status=status_of_stub,
                                     headers={"Retry-After": self.retry_after})
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("content-range", "content-type", "x-upload-content-length",
                                    "x-upload-content-type")}
        headers["Content-Length"] = str(len(body))
        assert self._http is not None
        async with self._http.request(request.method, self.upstream + request.path_qs,
                                      headers=headers, data=body,
                                      allow_redirects=False) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() in ("range", "location")}
            if "Location" in out:
                out["Location"] = out["Location"].replace(self.upstream, self.url)
            if resp.status == 308 and "Range" in out and self.lie_offset:
                end = int(out["Range"].rsplit("-", 1)[1]) + self.lie_offset
                out["Range"] = f"bytes=0-{end}"
            if resp.status == 200 and self.lie_crc and resp.content_type == "application/json":
                doc = await resp.json()
                doc["crc32c"] = "AAAAAA=="
                return web.json_response(doc, headers=out)
            return web.Response(status=resp.status, body=payload, headers=out,
                                content_type=resp.content_type)
