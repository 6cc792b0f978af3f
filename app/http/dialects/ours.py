"""Our own dialect: ``/upload/<name>`` with GCS/YouTube-style ``Content-Range``.

The full contract is ``docs/protocol.md``. Errors are
``{"error": <code>, "message": <text>}`` with the error's own status.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from aiohttp import hdrs, web

from app.core.protocol import Chunk, Probe, format_range, parse_content_range, parse_length
from app.engine.model import Outcome
from app.errors import BadRequest, UploadError
from app.http import edge
from app.http.body import read_small_body
from app.http.dialect import Route

#: Largest JSON body accepted on POST initiation (object metadata).
MAX_INITIATION_BODY = 64 * 1024
UPLOAD_PREFIX = "/upload/"
NAME = "upload"
#: Asks for incomplete states as 200 + X-Http-Status-Code-Override: 308.
NO_308 = "X-GUploader-No-308"


class OurDialect:
    name = NAME

    def routes(self) -> Sequence[Route]:
        # [\s\S]: a name with a line break must reach validation (400), not miss.
        path = UPLOAD_PREFIX + r"{name:[\s\S]*}"
        return [
            Route("PUT", path, put_upload),
            Route("POST", path, post_upload),
            Route("DELETE", path, delete_upload),
        ]

    def render_error(self, error: UploadError) -> web.StreamResponse:
        return error_response(error)


def error_response(error: UploadError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers())


def _name(request: web.Request) -> str:
    return edge.decode_name(request.rel_url.raw_path.removeprefix(UPLOAD_PREFIX))


def _respond(request: web.Request, outcome: Outcome) -> web.Response:
    edge.note_outcome(request, outcome)
    info = outcome.info
    if info.is_complete:
        return web.json_response(edge.object_json(request, info), status=200)
    headers = {}
    rng = format_range(info.offset)
    if rng is not None:
        headers["Range"] = rng
    if request.headers.get(NO_308, "").strip().lower() == "yes":
        # Google's workaround for HTTP stacks (browsers' among them) that take
        # any 308 for a redirect: the same answer, its real status in a header.
        headers["X-Http-Status-Code-Override"] = "308"
        return web.Response(status=200, headers=headers)
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
    engine = edge.engine(request)
    digests = edge.goog_hash_digests(request)
    if isinstance(parsed, Probe):
        if content_length is None or content_length > 0:
            raise BadRequest("a status probe ('bytes */...') must have an empty body")
        grant = await edge.authorize(request, name, "status", dialect=NAME)
        return _respond(request, await engine.status(name, parsed.total, grant, digests))
    body = edge.body_of(request)
    content_type = edge.content_type(request.headers.get(hdrs.CONTENT_TYPE), "Content-Type")
    if parsed is None:
        grant = await edge.authorize(request, name, "create", dialect=NAME)
        outcome = await engine.put_whole(
            name, body, content_length=content_length, content_type=content_type,
            grant=grant, digests=digests,
        )
    else:
        action = "create" if parsed.start == 0 else "append"
        grant = await edge.authorize(request, name, action, dialect=NAME)
        outcome = await engine.put_chunk(
            name, parsed, body, content_length=content_length, content_type=content_type,
            grant=grant, digests=digests,
        )
    return _respond(request, outcome)


async def post_upload(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    total = parse_length(request.headers.get("X-Upload-Content-Length"), "X-Upload-Content-Length")
    grant = await edge.authorize(request, name, "create", dialect=NAME)
    metadata, body_type = await _initiation_body(request)
    content_type = edge.content_type(
        request.headers.get("X-Upload-Content-Type") or body_type, "X-Upload-Content-Type"
    )
    info = await edge.engine(request).initiate(
        name, total=total, content_type=content_type, metadata=metadata, grant=grant
    )
    location = f"{edge.public_base(request)}{request.rel_url.raw_path}"
    edge.note_state(request, info)
    return web.json_response(
        {"name": info.name, "offset": info.offset, "total": info.total},
        status=200,
        headers={"Location": location},
    )


async def _initiation_body(request: web.Request) -> tuple[dict[str, str], str | None]:
    """Optional JSON object resource: ``{"metadata": {...}, "contentType": ...}``."""
    if not request.can_read_body:
        return {}, None
    raw = await read_small_body(request, MAX_INITIATION_BODY, "initiation body")
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
    grant = await edge.authorize(request, name, "cancel", dialect=NAME)
    await edge.engine(request).cancel(name, grant)
    return web.Response(status=204)
