"""Request bodies as the engine reads them, with lazy ``100 Continue``.

``100 Continue`` is sent on the first read, never up front: only once auth and
the offset checks have passed does a client that asked for it send its body.
(aiohttp runs a route's ``expect_handler`` before the middlewares, so the
default one, which answers at once, is replaced by ``expect_continue``.)
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from app.engine.bodies import BodyInterrupted
from app.errors import BadRequest
from app.http import keys


class RequestBody:
    """Adapts ``request.content`` to the engine's ``Body``."""

    def __init__(self, request: web.Request, read_timeout: float) -> None:
        self._request = request
        self._content = request.content
        self._read_timeout = read_timeout
        self._aborted = False
        self._pending: asyncio.Timeout | None = None

    async def read(self) -> bytes:
        data = await self._read()
        request = self._request
        request[keys.REQUEST_RECEIVED] = request.get(keys.REQUEST_RECEIVED, 0) + len(data)
        return data

    async def _read(self) -> bytes:
        if self._aborted:
            return self._take_buffered()
        try:
            await send_continue(self._request)
            async with asyncio.timeout(self._read_timeout) as self._pending:
                return await self._content.readany()
        except TimeoutError:
            if self._aborted:
                return self._take_buffered()
            raise BodyInterrupted(f"no body bytes for {self._read_timeout:g}s") from None
        except (ConnectionError, HttpProcessingError, aiohttp.ClientError, RuntimeError) as exc:
            # Bytes that arrived before the connection dropped still count;
            # the next read finds none left and ends the body.
            salvaged = self._salvage()
            if salvaged:
                return salvaged
            raise BodyInterrupted(str(exc) or type(exc).__name__) from None
        finally:
            self._pending = None

    def _salvage(self) -> bytes:
        """What aiohttp still buffers once the connection is gone. Its reads
        raise as soon as the connection is lost, buffered bytes or not; those
        bytes are an intact prefix of the body (TCP delivered them in order),
        so they are handed over rather than dropped."""
        try:
            return self._content._read_nowait(-1)
        except Exception:
            return b""

    def abort(self) -> None:
        # Wake a pending read through its timeout rather than by poisoning the
        # stream, so bytes aiohttp already buffered are still handed over.
        self._aborted = True
        if self._pending is not None:
            self._pending.reschedule(asyncio.get_running_loop().time())

    def _take_buffered(self) -> bytes:
        try:
            data = self._content.read_nowait()
        except Exception:
            data = self._salvage()
        if not data:
            raise BodyInterrupted("another request took over this upload")
        return data


async def expect_continue(request: web.Request) -> web.Response | None:
    """Never answer ``100 Continue`` up front (see the module docstring)."""
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return web.json_response(
            {"error": "expectation_failed",
             "message": "only 'Expect: 100-continue' is supported"},
            status=417,
        )
    return None


async def send_continue(request: web.Request) -> None:
    """Send ``100 Continue`` once, if the client asked for it, just before the
    first body read."""
    if (
        request.get(keys.CONTINUE_SENT) is None
        and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
        and request.version >= aiohttp.HttpVersion11
    ):
        request[keys.CONTINUE_SENT] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def send_interim(
    request: web.Request, status: int, reason: str, headers: dict[str, str]
) -> bool:
    """Write an informational (1xx) response, such as the resumable-upload
    draft's ``104 Upload Resumption Supported``, on the raw transport before the
    final one, as ``send_continue`` does for ``100 Continue``. HTTP/1.0 clients
    get none (RFC 9110 section 15.2). Returns whether it was sent."""
    if request.version < aiohttp.HttpVersion11:
        return False
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} has a line break")
        lines.append(f"{name}: {value}")
    await request.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return True


async def read_small_body(request: web.Request, limit: int, what: str) -> bytes:
    """A body that must be small (initiation metadata), read whole; a
    ``BadRequest`` past ``limit`` bytes."""
    if (request.content_length or 0) > limit:
        raise BadRequest(f"the {what} is larger than {limit} bytes")
    await send_continue(request)
    raw = bytearray()
    while len(raw) <= limit and (data := await request.content.readany()):
        raw += data
    if len(raw) > limit:
        raise BadRequest(f"the {what} is larger than {limit} bytes")
    return bytes(raw)
