"""The IETF draft "Resumable Uploads for HTTP" on ``tus.path``, every interop
version shipped clients speak (``app/core/ietf_versions.py`` says how they differ).

A request is this dialect's when it carries ``Upload-Draft-Interop-Version``;
tus shares the paths and takes the rest.

* creation: ``POST``/``PUT``/``PATCH`` on ``tus.path`` with ``Upload-Complete``
  (``Upload-Incomplete`` in -01): a session is made under an unguessable id,
  ``104 Upload Resumption Supported`` announces its URL, then the body streams in;
* offset retrieval ``HEAD``, append ``PATCH`` (exact offset), cancel ``DELETE``
  on ``tus.path + id``; ``OPTIONS`` on both announces ``Upload-Limit``.

The object is named by the auth webhook (``name``), else by
``Content-Disposition``'s file name under ``tus.prefix``, else by the id.
Errors are RFC 9457 problem documents.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import hdrs, web

from app.config import Config
from app.core import ietf_versions as iv
from app.core.content_disposition import filename_of
from app.core.grant import Grant
from app.core.http_digests import content_check, repr_crc32c, repr_digest_header
from app.core.model import UploadInfo
from app.core.protocol import (
    MAX_OBJECT_SIZE,
    MAX_PARTS,
    id_session_name,
    parse_length,
    validate_name,
)
from app.engine.model import ClientDigests, Outcome
from app.errors import AuthUnavailable, InvalidName, OffsetMismatch, UploadError, UploadNotFound
from app.http import edge, keys
from app.http.body import send_interim
from app.http.dialect import Route
from app.http.dialects.ietf_problems import (
    CompletedUpload,
    FieldProblem,
    LengthProblem,
    ProvidedOffsetMismatch,
    UnsupportedPatch,
    problem_response,
)

log = logging.getLogger(__name__)

NAME = "ietf"

Handler = Callable[[web.Request, iv.InteropVersion], Awaitable[web.StreamResponse]]


def is_ietf_request(request: web.Request) -> bool:
    return iv.INTEROP_HEADER in request.headers


class IetfDialect:
    name = NAME

    def __init__(self, config: Config) -> None:
        self._path = config.tus.path

    def routes(self) -> Sequence[Route]:
        upload = self._path + "{upload_id}"
        served: list[tuple[str, str, Handler]] = [
            ("POST", self._path, create_upload),
            ("PUT", self._path, create_upload),
            ("PATCH", self._path, create_upload),
            ("OPTIONS", self._path, options),
            ("HEAD", upload, retrieve_offset),
            # The draft allows GET for offset retrieval too; HEAD is recommended.
            ("GET", upload, retrieve_offset),
            ("PATCH", upload, append_upload),
            ("DELETE", upload, cancel_upload),
            ("OPTIONS", upload, options),
        ]
        return [Route(m, p, _versioned(h), accepts=is_ietf_request) for m, p, h in served]

    def render_error(self, error: UploadError) -> web.StreamResponse:
        return problem_response(error, iv.CURRENT)


def _versioned(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Negotiate the interop version, then render every error in its shape."""

    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            version = iv.negotiate(request.headers[iv.INTEROP_HEADER])
        except iv.FieldError as exc:
            return problem_response(FieldProblem(str(exc)), iv.CURRENT)
        try:
            return await handler(request, version)
        except iv.InconsistentLength as exc:
            return problem_response(LengthProblem(str(exc)), version)
        except iv.FieldError as exc:
            return problem_response(FieldProblem(str(exc)), version)
        except UploadError as exc:
            return problem_response(exc, version, _limits(request, None, None))

    return serve


# -- shared pieces -------------------------------------------------------------


def _config(request: web.Request) -> Config:
    return request.app[keys.CONFIG]


def _limits(request: web.Request, info: UploadInfo | None, grant: Grant | None) -> iv.UploadLimits:
    storage = _config(request).storage
    sizes = [MAX_OBJECT_SIZE]
    if storage.max_upload_size is not None:
        sizes.append(storage.max_upload_size)
    if grant is not None and grant.max_size is not None:
        sizes.append(grant.max_size)
    if info is None:
        return iv.UploadLimits(max_size=min(sizes), max_age=int(storage.upload_ttl))
    if not info.is_complete:
        sizes.append(info.part_size * MAX_PARTS)
    age = int(info.updated_at + storage.upload_ttl - time.time())
    return iv.UploadLimits(max_size=min(sizes), max_age=None if info.is_complete else age)


def _upload_url(request: web.Request, upload_id: str) -> str:
    return f"{edge.public_base(request)}{_config(request).tus.path}{upload_id}"


def _content_length(request: web.Request) -> int | None:
    length = parse_length(request.headers.get(hdrs.CONTENT_LENGTH), "Content-Length")
    if length is None and not request.body_exists:
        # Neither Content-Length nor chunked: the content is empty (RFC 9112 6.3).
        return 0
    return length


def _repr_digests(request: web.Request) -> ClientDigests | None:
    crc = repr_crc32c(request.headers.get("Repr-Digest"))
    return None if crc is None else ClientDigests(crc32c=crc)


async def _session(request: web.Request) -> tuple[str, UploadInfo]:
    """The session an upload URL addresses, and its state as stored."""
    upload_id = request.rel_url.raw_path.removeprefix(_config(request).tus.path)
    try:
        session = id_session_name(NAME, upload_id)
    except InvalidName:
        raise UploadNotFound("no upload resource has this URL") from None
    return session, await edge.engine(request).lookup(session)


def _proposed_name(request: web.Request, upload_id: str) -> str:
    prefix = _config(request).tus.prefix
    disposition = request.headers.get(hdrs.CONTENT_DISPOSITION)
    filename = filename_of(disposition) if disposition is not None else None
    if filename is not None:
        try:
            return validate_name(prefix + filename)
        except InvalidName:
            log.info("ignoring an unusable Content-Disposition file name %r", filename)
    return prefix + upload_id


def _target(grant: Grant, proposed: str) -> str:
    if grant.name is None:
        return proposed
    try:
        return validate_name(grant.name)
    except InvalidName as exc:
        log.error("the auth webhook named the object %r: %s", grant.name, exc.message)
        raise AuthUnavailable("the auth webhook chose an invalid object name") from None


def _representation_type(request: web.Request) -> str | None:
    value = edge.content_type(request.headers.get(hdrs.CONTENT_TYPE), "Content-Type")
    if value is None or _media_type(value) == iv.PARTIAL_UPLOAD:
        return None
    return value


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _completed_answer(
    request: web.Request, version: iv.InteropVersion, info: UploadInfo,
    extra: dict[str, str] | None = None,
) -> web.Response:
    done = info.completed
    assert done is not None
    headers = {
        "Upload-Offset": str(done.size),
        "Repr-Digest": repr_digest_header(done.crc32c),
        **version.complete_headers(True),
        **(extra or {}),
    }
    doc = edge.object_json(request, info)
    return web.json_response(doc, status=200, headers=headers)


def _answer(
    request: web.Request, version: iv.InteropVersion, outcome: Outcome, *,
    complete_requested: bool, created: dict[str, str] | None = None,
) -> web.Response:
    """The final answer to a creation (``created``: its Location and limits)
    or an append."""
    edge.note_outcome(request, outcome)
    info = outcome.info
    request[keys.REQUEST_NAME] = info.object_name
    if info.is_complete:
        return _completed_answer(request, version, info, created)
    if complete_requested and not outcome.interrupted:
        raise LengthProblem(
            f"the request said it completes the upload, but {info.offset} of "
            f"{info.total} bytes are stored; append the rest",
            offset=info.offset,
        )
    headers = {"Upload-Offset": str(info.offset), **version.complete_headers(False)}
    if created is not None:
        return web.Response(status=201, headers={**headers, **created})
    return web.Response(status=version.append_status, headers=headers)


# -- the requests --------------------------------------------------------------


async def create_upload(request: web.Request, version: iv.InteropVersion) -> web.StreamResponse:
    headers = request.headers
    complete = version.read_complete(headers)
    if complete is None:
        raise iv.FieldError(f"creating a resumable upload needs {version.complete_field}")
    if "Upload-Offset" in headers:
        raise iv.FieldError("an upload creation must not carry Upload-Offset")
    content_length = _content_length(request)
    total = iv.stated_total(offset=0, upload_length=iv.read_length(headers),
                            content_length=content_length, complete=complete)
    check = content_check(headers.get("Content-Digest"))
    digests = _repr_digests(request)
    content_type = _representation_type(request)
    upload_id = secrets.token_urlsafe(24)  # 192 random bits: the URL is a capability
    session = id_session_name(NAME, upload_id)
    proposed = _proposed_name(request, upload_id)
    grant = await edge.authorize(request, proposed, "create", dialect=NAME)
    target = _target(grant, proposed)
    engine = edge.engine(request)
    info = await engine.initiate(session, total=total, content_type=content_type, metadata={},
                                 grant=grant, target=target)
    created = {"Location": _upload_url(request, upload_id)}
    if version.has_limits:
        created["Upload-Limit"] = _limits(request, info, grant).header(version)
    # Before any body byte: a client cut off from here on can resume.
    await send_interim(request, 104, "Upload Resumption Supported",
                       {iv.INTEROP_HEADER: str(version.number), **created})
    outcome = await engine.append(
        session, 0, edge.body_of(request), length=content_length, total=total, grant=grant,
        finish_at_eof=complete, digests=digests, check=check,
    )
    return _answer(request, version, outcome, complete_requested=complete, created=created)


async def retrieve_offset(request: web.Request, version: iv.InteropVersion) -> web.StreamResponse:
    version.check_probe_fields(request.headers)
    session, found = await _session(request)
    grant = await edge.authorize(request, found.object_name, "status", dialect=NAME)
    info = (await edge.engine(request).status(session, None, grant, known=found)).info
    edge.note_state(request, info)
    length = info.completed.size if info.completed is not None else info.total
    headers = {
        "Upload-Offset": str(length if info.is_complete else info.offset),
        **version.complete_headers(info.is_complete),
        "Cache-Control": "no-store",
    }
    if length is not None:
        headers["Upload-Length"] = str(length)
    if version.has_limits:
        headers["Upload-Limit"] = _limits(request, info, grant).header(version)
    return web.Response(status=204, headers=headers)


async def append_upload(request: web.Request, version: iv.InteropVersion) -> web.StreamResponse:
    headers = request.headers
    if version.needs_partial_upload_type and (
        _media_type(headers.get(hdrs.CONTENT_TYPE)) != iv.PARTIAL_UPLOAD
    ):
        raise UnsupportedPatch(f"an append must be sent as Content-Type: {iv.PARTIAL_UPLOAD}")
    offset = iv.read_offset(headers)
    if offset is None:
        raise iv.FieldError("an append needs Upload-Offset")
    complete = version.read_complete(headers)
    if complete is None:
        if version.requires_complete_on_append:
            raise iv.FieldError(f"an append needs {version.complete_field}")
        complete = True  # up to -05, an append without the field ended the upload
    content_length = _content_length(request)
    # Not checked against each other here: the length this request implies
    # rests on its offset, which only the engine can check (409 first).
    upload_length = iv.read_length(headers)
    total = upload_length if upload_length is not None else iv.stated_total(
        offset=offset, upload_length=None, content_length=content_length, complete=complete)
    check = content_check(headers.get("Content-Digest"))
    digests = _repr_digests(request)
    session, found = await _session(request)
    grant = await edge.authorize(request, found.object_name, "append", dialect=NAME)
    try:
        outcome = await edge.engine(request).append(
            session, offset, edge.body_of(request), length=content_length, total=total,
            grant=grant, finish_at_eof=complete, digests=digests, check=check,
        )
    except OffsetMismatch as exc:
        raise ProvidedOffsetMismatch(exc, offset) from None
    done = outcome.info.completed
    if found.is_complete and done is not None:
        if version.replays_completion and offset == done.size and content_length == 0:
            edge.note_state(request, outcome.info)
            return _completed_answer(request, version, outcome.info)
        raise CompletedUpload("the upload is already complete; nothing more can be appended")
    return _answer(request, version, outcome, complete_requested=complete)


async def cancel_upload(request: web.Request, version: iv.InteropVersion) -> web.StreamResponse:
    version.check_probe_fields(request.headers)
    session, found = await _session(request)
    grant = await edge.authorize(request, found.object_name, "cancel", dialect=NAME)
    await edge.engine(request).cancel(session, grant)
    return web.Response(status=204)


async def options(request: web.Request, version: iv.InteropVersion) -> web.StreamResponse:
    """What a client may learn before creating an upload: the limits (the
    draft requires ``Upload-Limit`` here; ``min-size=0`` when nothing else)."""
    limits = _limits(request, None, None)
    allow = "POST, PUT, PATCH, OPTIONS" if request.match_info.get("upload_id") is None \
        else "HEAD, PATCH, DELETE, OPTIONS"
    return web.Response(status=204, headers={
        "Upload-Limit": limits.header(version),
        "Accept-Patch": iv.PARTIAL_UPLOAD,
        "Allow": allow,
    })
