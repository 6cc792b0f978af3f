"""What every dialect's views share: names, auth, digests, answers' bookkeeping."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import hdrs, web

from app.auth.webhook import Action, AuthRequest
from app.core.digests import crc32c_b64, md5_b64, parse_goog_hash
from app.core.grant import Grant
from app.core.model import UploadInfo
from app.core.protocol import validate_name
from app.engine.engine import UploadEngine
from app.engine.model import ClientDigests, Outcome
from app.errors import BadRequest, InvalidName
from app.http import keys
from app.http.body import RequestBody

_CONTENT_TYPE = re.compile(r"[!-~][ -~]{0,254}")


def engine(request: web.Request) -> UploadEngine:
    return request.app[keys.ENGINE]


def body_of(request: web.Request) -> RequestBody:
    return RequestBody(request, request.app[keys.CONFIG].server.read_timeout)


def decode_name(raw: str) -> str:
    """An upload name percent-decoded exactly once from a raw path segment.

    aiohttp's ``match_info`` leaves escapes that are not UTF-8 as they are, so
    ``%FF`` and ``%25FF`` would name the same object."""
    try:
        name = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName("the upload name is not valid UTF-8 once percent-decoded") from None
    return validate_name(name)


def content_type(value: str | None, header: str) -> str | None:
    if value is not None and not _CONTENT_TYPE.fullmatch(value):
        raise BadRequest(f"{header} must be printable ASCII, like 'video/mp4'")
    return value


def public_base(request: web.Request) -> str:
    """The absolute base URL clients reach this service at."""
    base = request.app[keys.CONFIG].server.public_url or f"{request.scheme}://{request.host}"
    return base.rstrip("/")


def object_key(request: web.Request, name: str) -> str:
    storage = request.app[keys.CONFIG].storage
    return f"{storage.s3.prefix}{name}" if storage.backend == "s3" else name


async def authorize(
    request: web.Request,
    name: str,
    action: Action,
    *,
    dialect: str,
    extra: Mapping[str, str] | None = None,
    stored_as: str | None = None,
) -> Grant:
    """Ask the authorizer before any body byte is read. ``extra``: dialect
    facts for the webhook (a GCS bucket); ``stored_as``: the object's name in
    the store when it differs from ``name`` (a bucket's key prefix added)."""
    request[keys.REQUEST_ACTION] = action
    request[keys.REQUEST_DIALECT] = dialect
    request[keys.REQUEST_NAME] = name
    auth_request = AuthRequest(
        action=action,
        name=name,
        key=object_key(request, name if stored_as is None else stored_as),
        content_length=request.content_length,
        content_range=request.headers.get(hdrs.CONTENT_RANGE),
        content_type=request.headers.get(hdrs.CONTENT_TYPE),
        remote_addr=request.remote,
        headers=request.headers,
        dialect=dialect,
        extra=dict(extra or {}),
    )
    # No body byte is taken off the socket while the webhook decides: without
    # this, aiohttp keeps reading into the request's buffer up to its high-water
    # mark on top of the first read, for every unauthenticated sender at once.
    # (An allowed request resumes here; its body is read only once the engine
    # asks for it, with 100-continue where the client wants it.)
    hold = request.can_read_body and not request.content.is_eof()
    if hold:
        request.protocol.pause_reading()
    try:
        return await request.app[keys.AUTHORIZER].authorize(auth_request)
    finally:
        if hold and request.protocol.transport is not None:
            request.protocol.resume_reading()


def goog_hash_digests(request: web.Request) -> ClientDigests | None:
    """Digests a Google-style client declared in ``x-goog-hash``."""
    header = request.headers.get("x-goog-hash")
    if header is None:
        return None
    try:
        found = parse_goog_hash(header)
    except ValueError as exc:
        raise BadRequest(f"malformed x-goog-hash header: {exc}") from None
    return ClientDigests(crc32c=found.get("crc32c"), md5=found.get("md5"))


def note_outcome(request: web.Request, outcome: Outcome) -> None:
    """Offsets and byte counts for the access log and metrics."""
    info = outcome.info
    request[keys.REQUEST_OFFSET] = info.offset
    request[keys.REQUEST_STORED] = outcome.stored
    # The engine counts what this request stored from the offset it started at,
    # and nothing after storing (settling the total, finishing) moves the offset.
    request[keys.REQUEST_OFFSET_BEFORE] = info.offset - outcome.stored


def note_state(request: web.Request, info: UploadInfo) -> None:
    request[keys.REQUEST_OFFSET] = info.offset


def object_json(request: web.Request, info: UploadInfo) -> dict[str, Any]:
    """The completed object in our JSON shape (our dialect, the IETF draft's
    completing answer). ``bucket`` only when it is an S3 bucket's name: the
    filesystem store's is its root directory, no business of clients."""
    done = info.completed
    assert done is not None
    body: dict[str, Any] = {"name": info.object_name}
    if request.app[keys.CONFIG].storage.backend == "s3":
        body["bucket"] = done.bucket
    body |= {
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
