"""Thin HTTP views: parse → authorize → engine → response.

Everything about the wire lives here and in ``protocol``; errors are
``UploadError``s that the server middleware renders as JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from app.auth.webhook import Action, AuthRequest, Grant
from app.core.digests import crc32c_b64, md5_b64, parse_goog_hash
from app.core.protocol import (
    Chunk,
    Probe,
    format_range,
    parse_content_range,
    parse_length,
    validate_name,
)
from app.engine.engine import BodyInterrupted, ClientDigests, Outcome
from app.errors import BadRequest, InvalidName
from app.http import keys
from app.stores.base import UploadInfo

#: Largest JSON body accepted on POST initiation (object metadata).
MAX_INITIATION_BODY = 64 * 1024
UPLOAD_PREFIX = "/upload/"
_CONTINUE_SENT = "continue_sent"
_CONTENT_TYPE = re.compile(r"[!-~][ -~]{0,254}")


class RequestBody:
    """Adapts ``request.content`` to the engine's ``Body``.

    ``100 Continue`` is sent lazily, on the first read: only once auth and the
    offset checks have passed does a client that asked for it send its body.
    """

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
            raise BodyInterrupted(str(exc) or type(exc).__name__) from None
        finally:
            self._pending = None

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
            data = b""
        if not data:
            raise BodyInterrupted("another request took over this upload")
        return data


async def expect_continue(request: web.Request) -> web.Response | None:
    """Never answer ``100 Continue`` up front: ``send_continue`` does it once
    auth and the offset checks have passed. (aiohttp runs this before the
    middlewares, so an answer from here is rendered here.)"""
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
        request.get(_CONTINUE_SENT) is None
        and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
        and request.version >= aiohttp.HttpVersion11
    ):
        request[_CONTINUE_SENT] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def _name(request: web.Request) -> str:
    """The upload name, percent-decoded exactly once from the raw path.

    aiohttp's ``match_info`` leaves escapes that are not UTF-8 as they are, so
    ``%FF`` and ``%25FF`` would name the same object."""
    raw = request.rel_url.raw_path.removeprefix(UPLOAD_PREFIX)
    try:
        name = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName("the upload name is not valid UTF-8 once percent-decoded") from None
    return validate_name(name)


def _content_type(value: str | None, header: str) -> str | None:
    if value is not None and not _CONTENT_TYPE.fullmatch(value):
        raise BadRequest(f"{header} must be printable ASCII, like 'video/mp4'")
    return value


def _object_key(request: web.Request, name: str) -> str:
    storage = request.app[keys.CONFIG].storage
    return f"{storage.s3.prefix}{name}" if storage.backend == "s3" else name


async def _authorize(request: web.Request, name: str, action: Action) -> Grant:
    auth_request = AuthRequest(
        action=action,
        name=name,
        key=_object_key(request, name),
        content_length=request.content_length,
        content_range=request.headers.get(hdrs.CONTENT_RANGE),
        content_type=request.headers.get(hdrs.CONTENT_TYPE),
        remote_addr=request.remote,
        headers=request.headers,
    )
    grant = await request.app[keys.AUTHORIZER].authorize(auth_request)
    request[keys.REQUEST_ACTION] = action
    return grant


def _client_digests(request: web.Request) -> ClientDigests | None:
    header = request.headers.get("x-goog-hash")
    if header is None:
        return None
    try:
        found = parse_goog_hash(header)
    except ValueError as exc:
        raise BadRequest(f"malformed x-goog-hash header: {exc}") from None
    return ClientDigests(crc32c=found.get("crc32c"), md5=found.get("md5"))


def object_json(info: UploadInfo) -> dict[str, Any]:
    done = info.completed
    assert done is not None
    body: dict[str, Any] = {
        "name": info.name,
        "bucket": done.bucket,
        "key": done.key,
        "size": done.size,
        "contentType": info.content_type,
        "etag": done.etag,
        "crc32c": crc32c_b64(done.crc32c),
    }
    if done.md5 is not None:
        body["md5Hash"] = md5_b64(done.md5)
    if info.metadata:
        body["metadata"] = dict(info.metadata)
    return body


def _respond(request: web.Request, outcome: Outcome) -> web.Response:
    info = outcome.info
    request[keys.REQUEST_OFFSET] = info.offset
    # The engine counts what this request stored from the offset it started at,
    # and nothing after storing (settling the total, finishing) moves the offset.
    request[keys.REQUEST_OFFSET_BEFORE] = info.offset - outcome.stored
    if info.is_complete:
        return web.json_response(object_json(info), status=200)
    headers = {}
    rng = format_range(info.offset)
    if rng is not None:
        headers["Range"] = rng
    # No Location on a 308: HTTP clients would follow it as a redirect.
    # GCS's reason phrase: to a human reading curl -i, this is no redirect.
    return web.Response(status=308, reason="Resume Incomplete", headers=headers)


async def put_upload(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    header = request.headers.get(hdrs.CONTENT_RANGE)
    parsed: Probe | Chunk | None = parse_content_range(header) if header is not None else None
    content_length = parse_length(request.headers.get(hdrs.CONTENT_LENGTH), "Content-Length")
    if content_length is None and not request.body_exists:
        # Neither Content-Length nor chunked: the body is empty by definition
        # (RFC 9112 6.3), not a connection that dropped.
        content_length = 0
    engine = request.app[keys.ENGINE]
    digests = _client_digests(request)
    if isinstance(parsed, Probe):
        if content_length is None or content_length > 0:
            raise BadRequest("a status probe ('bytes */...') must have an empty body")
        grant = await _authorize(request, name, "status")
        return _respond(request, await engine.status(name, parsed.total, grant, digests))
    body = RequestBody(request, request.app[keys.CONFIG].server.read_timeout)
    content_type = _content_type(request.headers.get(hdrs.CONTENT_TYPE), "Content-Type")
    if parsed is None:
        grant = await _authorize(request, name, "create")
        outcome = await engine.put_whole(
            name, body, content_length=content_length, content_type=content_type,
            grant=grant, digests=digests,
        )
    else:
        grant = await _authorize(request, name, "create" if parsed.start == 0 else "append")
        outcome = await engine.put_chunk(
            name, parsed, body, content_length=content_length, content_type=content_type,
            grant=grant, digests=digests,
        )
    request[keys.REQUEST_STORED] = outcome.stored
    return _respond(request, outcome)


async def post_upload(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    total = parse_length(request.headers.get("X-Upload-Content-Length"), "X-Upload-Content-Length")
    grant = await _authorize(request, name, "create")
    metadata, body_type = await _initiation_body(request)
    content_type = _content_type(
        request.headers.get("X-Upload-Content-Type") or body_type, "X-Upload-Content-Type"
    )
    info = await request.app[keys.ENGINE].initiate(
        name, total=total, content_type=content_type, metadata=metadata, grant=grant
    )
    base = request.app[keys.CONFIG].server.public_url or f"{request.scheme}://{request.host}"
    location = f"{base.rstrip('/')}{request.rel_url.raw_path}"
    request[keys.REQUEST_OFFSET] = info.offset
    return web.json_response(
        {"name": info.name, "offset": info.offset, "total": info.total},
        status=200,
        headers={"Location": location},
    )


async def _initiation_body(request: web.Request) -> tuple[dict[str, str], str | None]:
    """Optional JSON object resource: ``{"metadata": {...}, "contentType": ...}``."""
    if not request.can_read_body:
        return {}, None
    if (request.content_length or 0) > MAX_INITIATION_BODY:
        raise BadRequest(f"the initiation body is larger than {MAX_INITIATION_BODY} bytes")
    await send_continue(request)
    raw = bytearray()
    while len(raw) <= MAX_INITIATION_BODY and (data := await request.content.readany()):
        raw += data
    if len(raw) > MAX_INITIATION_BODY:
        raise BadRequest(f"the initiation body is larger than {MAX_INITIATION_BODY} bytes")
    if not raw.strip():
        return {}, None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the initiation body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise BadRequest("the initiation body must be a JSON object")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadRequest("'metadata' must map strings to strings")
    content_type = doc.get("contentType")
    if content_type is not None and not isinstance(content_type, str):
        raise BadRequest("'contentType' must be a string")
    return metadata, content_type


async def delete_upload(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    grant = await _authorize(request, name, "cancel")
    await request.app[keys.ENGINE].cancel(name, grant)
    return web.Response(status=204)
