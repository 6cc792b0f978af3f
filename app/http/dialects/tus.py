"""tus 1.0.0 (tus.io/protocols/resumable-upload) under ``tus.path``, with the
creation, creation-with-upload, creation-defer-length, termination,
expiration, checksum and concatenation extensions.

Uploads are addressed by an unguessable id (128 random bits) and live as id
sessions (``id_session_name("tus", id)``) that finish into their object: the
auth webhook's ``name``, else ``Upload-Metadata`` ``name``/``filename`` under
``tus.prefix``, else the id under ``tus.prefix``. Every rule (exact offsets,
checksums before a byte counts, limits, owners, expiry) is the engine's.

This is the catch-all on the shared path: the IETF draft's routes take the
requests that carry ``Upload-Draft-Interop-Version``. Errors are plain text
with the status tus defines (409 offset, 412 version, 415 type, 460 checksum,
410 expired) and ``Tus-Resumable``.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping, Sequence

from aiohttp import hdrs, web

from app.config import TusConfig
from app.core.checksums import ALGORITHMS
from app.core.model import UploadInfo
from app.core.protocol import MAX_OBJECT_SIZE, id_session_name, validate_name
from app.engine.engine import UploadEngine
from app.errors import (
    BadRequest,
    ChecksumMismatch,
    Forbidden,
    InvalidName,
    OffsetMismatch,
    UploadError,
    UploadExpired,
    UploadNotFound,
)
from app.http import edge, keys
from app.http.dialect import Handler, Route
from app.http.dialects import tus_concat
from app.http.dialects.tus_headers import (
    CONCAT_KEY,
    TUS_VERSION,
    Concat,
    UnsupportedMediaType,
    check_version,
    concat_of,
    concat_record,
    format_metadata,
    http_date,
    parse_checksum,
    parse_concat,
    parse_metadata,
    parse_number,
)

log = logging.getLogger(__name__)

NAME = "tus"
OFFSET_TYPE = "application/offset+octet-stream"
#: Where partial uploads (``Upload-Concat: partial``) finish: hidden objects
#: named by their unguessable id, read back when a final upload joins them.
PARTIALS_PREFIX = ".tus-partials/"
_BASE_EXTENSIONS = ("creation", "creation-with-upload", "creation-defer-length",
                    "termination", "expiration", "checksum")
_MIME = re.compile(r"[!-~]+/[!-~]+( ?;[ -~]*)?")


class MethodNotAllowed(UploadError):
    status = 405
    code = "method_not_allowed"


class TusDialect:
    name = NAME

    def __init__(self, config: TusConfig) -> None:
        self._path = config.path

    def routes(self) -> Sequence[Route]:
        item = self._path + "{upload_id}"
        return [
            Route("OPTIONS", self._path, options),
            Route("OPTIONS", item, options),
            Route("POST", self._path, create),
            Route("POST", item, overridden),
            Route("HEAD", item, head),
            Route("PATCH", item, patch),
            Route("DELETE", item, delete),
        ]

    def render_error(self, error: UploadError) -> web.StreamResponse:
        return error_response(error)


def error_response(error: UploadError) -> web.Response:
    status, reason = error.status, None
    if isinstance(error, ChecksumMismatch):
        status, reason = 460, "Checksum Mismatch"
    elif isinstance(error, UploadExpired):
        status = 410
    headers = {k: v for k, v in error.headers().items() if k != "Range"}
    headers["Tus-Resumable"] = TUS_VERSION
    if isinstance(error, OffsetMismatch):
        headers["Upload-Offset"] = str(error.offset)
    return web.Response(status=status, reason=reason, text=error.message + "\n", headers=headers)


# -- helpers ------------------------------------------------------------------


def _tus(request: web.Request) -> TusConfig:
    return request.app[keys.CONFIG].tus


def _session(request: web.Request) -> str:
    try:
        return id_session_name(NAME, request.match_info["upload_id"])
    except InvalidName:
        raise UploadNotFound("no such upload") from None


def location(request: web.Request, upload_id: str) -> str:
    return f"{edge.public_base(request)}{_tus(request).path}{upload_id}"


def _offset(info: UploadInfo) -> int:
    return info.completed.size if info.completed is not None else info.offset


def _state_headers(engine: UploadEngine, info: UploadInfo) -> dict[str, str]:
    headers = {"Tus-Resumable": TUS_VERSION}
    expires = engine.expires_at(info)
    if expires is not None:
        headers["Upload-Expires"] = http_date(expires)
    return headers


def _content_type_of(metadata: Mapping[str, str]) -> str | None:
    """The object's type from the metadata clients send (Uppy: ``type``,
    tus-js-client users: ``filetype``); anything unusable is ignored."""
    for key in ("filetype", "type", "contentType"):
        value = metadata.get(key)
        if value and len(value) < 256 and _MIME.fullmatch(value):
            return value
    return None


def object_name(request: web.Request, metadata: Mapping[str, str], upload_id: str) -> str:
    """The default object of a new upload (before the webhook's say)."""
    prefix = _tus(request).prefix
    for key in ("name", "filename"):
        value = metadata.get(key)
        if value:
            return validate_name(prefix + value)
    return validate_name(prefix + upload_id)


def new_upload_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits, URL-safe


def _body_length(request: web.Request) -> int | None:
    """Content-Length; 0 for a request without body; None for a chunked one."""
    length = parse_number(request.headers.get(hdrs.CONTENT_LENGTH), "Content-Length")
    if length is None and not request.body_exists:
        return 0
    return length


def _check_offset_type(request: web.Request) -> None:
    value = request.headers.get(hdrs.CONTENT_TYPE, "")
    if value.split(";")[0].strip().lower() != OFFSET_TYPE:
        raise UnsupportedMediaType(f"upload data must be sent as Content-Type: {OFFSET_TYPE}")


# -- views --------------------------------------------------------------------


async def options(request: web.Request) -> web.StreamResponse:
    config = request.app[keys.CONFIG]
    extensions = list(_BASE_EXTENSIONS)
    if tus_concat.can_concatenate(request.app[keys.STORE]):
        extensions.append("concatenation")
    limit = config.storage.max_upload_size
    headers = {
        "Tus-Resumable": TUS_VERSION,
        "Tus-Version": TUS_VERSION,
        "Tus-Extension": ",".join(extensions),
        "Tus-Max-Size": str(min(limit, MAX_OBJECT_SIZE) if limit else MAX_OBJECT_SIZE),
        "Tus-Checksum-Algorithm": ",".join(ALGORITHMS),
    }
    return web.Response(status=204, headers=headers)


async def create(request: web.Request) -> web.StreamResponse:
    check_version(request.headers.get("Tus-Resumable"))
    override = request.headers.get("X-HTTP-Method-Override")
    if override is not None and override.strip().upper() != "POST":
        raise MethodNotAllowed(f"{override} needs an upload URL, not the creation URL")
    concat = parse_concat(request.headers.get("Upload-Concat"), _tus(request).path)
    metadata = parse_metadata(request.headers.get("Upload-Metadata"))
    if concat is not None and concat.final:
        return await create_final(request, concat, metadata)
    total = _declared_length(request)
    length = _body_length(request)
    with_upload = length != 0
    if with_upload:
        _check_offset_type(request)
    checksum = parse_checksum(request.headers.get("Upload-Checksum"))
    upload_id = new_upload_id()
    session = id_session_name(NAME, upload_id)
    if concat is not None:
        target = validate_name(PARTIALS_PREFIX + upload_id)
        metadata[CONCAT_KEY] = concat_record(concat)
    else:
        target = object_name(request, metadata, upload_id)
    grant = await edge.authorize(request, target, "create", dialect=NAME)
    if concat is None and grant.name is not None:
        target = validate_name(grant.name)
    engine = edge.engine(request)
    info = await engine.initiate(
        session, total=total, content_type=_content_type_of(metadata), metadata=metadata,
        grant=grant, target=target,
    )
    log.info("tus upload %s created for %r (%s bytes%s)", upload_id, target,
             "deferred" if total is None else total, ", partial" if concat else "")
    if total == 0:
        info = (await engine.status(session, 0, grant)).info
    headers = {"Location": location(request, upload_id)}
    if with_upload:
        outcome = await engine.append(
            session, 0, edge.body_of(request), length=length, total=None, grant=grant,
            check=checksum,
        )
        edge.note_outcome(request, outcome)
        info = outcome.info
        headers["Upload-Offset"] = str(_offset(info))
    else:
        edge.note_state(request, info)
    headers.update(_state_headers(engine, info))
    return web.Response(status=201, headers=headers)


def _declared_length(request: web.Request) -> int | None:
    total = parse_number(request.headers.get("Upload-Length"), "Upload-Length")
    defer = request.headers.get("Upload-Defer-Length")
    if defer is not None and defer.strip() != "1":
        raise BadRequest("Upload-Defer-Length must be 1")
    if (total is None) == (defer is None):
        raise BadRequest("send exactly one of Upload-Length and Upload-Defer-Length: 1")
    return total


async def create_final(
    request: web.Request, concat: Concat, metadata: dict[str, str]
) -> web.StreamResponse:
    """``Upload-Concat: final;<urls>``: one object from finished partial uploads."""
    if "Upload-Length" in request.headers:
        raise BadRequest("a final upload takes its length from its partial uploads")
    store = request.app[keys.STORE]
    if not tus_concat.can_concatenate(store):
        raise BadRequest("this server's store cannot join uploads (no concatenation)")
    engine = edge.engine(request)
    partials = [await tus_concat.finished_partial(engine, id_session_name(NAME, upload_id))
                for upload_id in concat.ids]
    upload_id = new_upload_id()
    session = id_session_name(NAME, upload_id)
    target = object_name(request, metadata, upload_id)
    grant = await edge.authorize(request, target, "create", dialect=NAME)
    if grant.name is not None:
        target = validate_name(grant.name)
    for partial in partials:
        await engine.status(partial.name, None, grant)  # the owner must be the same
    metadata[CONCAT_KEY] = concat_record(concat)
    info = await engine.initiate(
        session, total=sum(tus_concat.size_of(p) for p in partials),
        content_type=_content_type_of(metadata), metadata=metadata, grant=grant, target=target,
    )
    log.info("tus upload %s: joining %d partial uploads (%d bytes) into %r",
             upload_id, len(partials), info.total, target)
    outcome = await tus_concat.assemble(engine, store, info, partials, grant)
    edge.note_outcome(request, outcome)
    headers = {"Location": location(request, upload_id)}
    headers.update(_state_headers(engine, outcome.info))
    return web.Response(status=201, headers=headers)


async def head(request: web.Request) -> web.StreamResponse:
    check_version(request.headers.get("Tus-Resumable"))
    session = _session(request)
    engine = edge.engine(request)
    found = await engine.lookup(session)
    grant = await edge.authorize(request, found.object_name, "status", dialect=NAME)
    info = (await engine.status(session, None, grant, known=found)).info
    edge.note_state(request, info)
    headers = _state_headers(engine, info)
    headers["Cache-Control"] = "no-store"
    headers["Upload-Offset"] = str(_offset(info))
    if info.total is not None:
        headers["Upload-Length"] = str(info.total)
    else:
        headers["Upload-Defer-Length"] = "1"
    metadata = format_metadata(info.metadata)
    if metadata:
        headers["Upload-Metadata"] = metadata
    concat = concat_of(info.metadata)
    if concat is not None:
        headers["Upload-Concat"] = _concat_header(request, concat)
    return web.Response(status=200, headers=headers)


def _concat_header(request: web.Request, concat: Concat) -> str:
    if not concat.final:
        return "partial"
    return "final;" + " ".join(location(request, upload_id) for upload_id in concat.ids)


async def patch(request: web.Request) -> web.StreamResponse:
    check_version(request.headers.get("Tus-Resumable"))
    session = _session(request)
    _check_offset_type(request)
    start = parse_number(request.headers.get("Upload-Offset"), "Upload-Offset")
    if start is None:
        raise BadRequest("a PATCH must say where it starts in Upload-Offset")
    total = parse_number(request.headers.get("Upload-Length"), "Upload-Length")
    checksum = parse_checksum(request.headers.get("Upload-Checksum"))
    length = _body_length(request)
    engine = edge.engine(request)
    found = await engine.lookup(session)
    concat = concat_of(found.metadata)
    if concat is not None and concat.final:
        raise Forbidden("a final upload is assembled from its partial uploads; it takes no PATCH")
    grant = await edge.authorize(request, found.object_name, "append", dialect=NAME)
    outcome = await engine.append(
        session, start, edge.body_of(request), length=length, total=total, grant=grant,
        check=checksum,
    )
    edge.note_outcome(request, outcome)
    headers = _state_headers(engine, outcome.info)
    headers["Upload-Offset"] = str(_offset(outcome.info))
    return web.Response(status=204, headers=headers)


async def delete(request: web.Request) -> web.StreamResponse:
    check_version(request.headers.get("Tus-Resumable"))
    session = _session(request)
    engine = edge.engine(request)
    found = await engine.lookup(session)
    grant = await edge.authorize(request, found.object_name, "cancel", dialect=NAME)
    await engine.cancel(session, grant)
    return web.Response(status=204, headers={"Tus-Resumable": TUS_VERSION})


_OVERRIDES: dict[str, Handler] = {"PATCH": patch, "DELETE": delete, "HEAD": head}


async def overridden(request: web.Request) -> web.StreamResponse:
    """``POST`` + ``X-HTTP-Method-Override`` for stacks that cannot send
    PATCH or DELETE."""
    override = request.headers.get("X-HTTP-Method-Override", "").strip().upper()
    handler = _OVERRIDES.get(override)
    if handler is None:
        raise MethodNotAllowed(
            "POST on an upload needs X-HTTP-Method-Override: PATCH, DELETE or HEAD"
        )
    return await handler(request)
