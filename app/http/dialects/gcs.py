"""Google's JSON API upload dialect: ``/upload/storage/v1/b/{bucket}/o``.

What google-cloud-storage, gcsfs and Node's @google-cloud/storage send,
unchanged (``docs/gcs.md``):

* ``POST ?uploadType=resumable`` starts a session addressed by an upload id
  (an unguessable capability); chunks go by ``PUT`` or ``POST`` to its
  ``Location``, in every ``Content-Range`` form those clients use;
* ``POST ?uploadType=multipart`` (JSON metadata, then media) and
  ``?uploadType=media`` upload in one request, through an id session too, so
  a cut request never leaves a half object under the name;
* ``DELETE`` on a session cancels it (499, as Google answers);
* ``GET /storage/v1/b/{bucket}`` answers a minimal bucket resource.

Buckets are only those in ``gcs.buckets`` (name -> key prefix). Objects of
several sessions for one name: the last to complete wins, as in GCS.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from urllib.parse import quote

from aiohttp import hdrs, web

from app.auth.webhook import Action
from app.config import GcsConfig
from app.core.grant import Grant
from app.core.model import UploadInfo
from app.core.protocol import (
    Chunk,
    Probe,
    format_range,
    id_session_name,
    parse_length,
    validate_name,
)
from app.engine.model import ClientDigests, Md5Source, Outcome
from app.errors import BadRequest, InvalidName, UploadError, UploadNotFound
from app.http import edge, keys
from app.http.body import read_small_body
from app.http.dialect import Route
from app.http.dialects import gcs_render
from app.http.dialects.gcs_md5 import FollowedRequest, Md5Follower
from app.http.dialects.gcs_multipart import MultipartMedia, read_multipart_head
from app.http.dialects.gcs_wire import (
    ObjectRequest,
    OpenChunk,
    multipart_boundary,
    parse_object_json,
    parse_session_range,
)
from app.stores.base import ObjectLookup

NAME = "gcs"
UPLOAD_PATH = "/upload/storage/v1/b/{bucket}/o"
BUCKET_PATH = "/storage/v1/b/{bucket}"
#: Largest JSON metadata (initiation body or multipart head) read whole.
MAX_METADATA_BYTES = 64 * 1024


class ConditionNotMet(UploadError):
    status = 412
    code = "condition_not_met"


class GcsDialect:
    name = NAME

    def __init__(self, config: GcsConfig) -> None:
        self._buckets = dict(config.buckets)
        self._md5 = Md5Follower() if config.md5 else None

    def routes(self) -> Sequence[Route]:
        return [
            Route("POST", UPLOAD_PATH, self.post),
            Route("PUT", UPLOAD_PATH, self.put),
            Route("DELETE", UPLOAD_PATH, self.delete),
            Route("GET", BUCKET_PATH, self.get_bucket),
        ]

    def render_error(self, error: UploadError) -> web.StreamResponse:
        return web.json_response(
            gcs_render.error_of(error), status=error.status, headers=error.headers()
        )

    # -- routes -----------------------------------------------------------

    async def post(self, request: web.Request) -> web.StreamResponse:
        if "upload_id" in request.query:
            return await self._session_request(request)
        kind = request.query.get("uploadType")
        if kind == "resumable":
            return await self._initiate(request)
        if kind == "multipart":
            return await self._multipart(request)
        if kind == "media":
            return await self._media(request)
        raise BadRequest("uploadType must be 'resumable', 'multipart' or 'media'")

    async def put(self, request: web.Request) -> web.StreamResponse:
        if "upload_id" not in request.query:
            raise BadRequest("PUT needs a session URL (…?uploadType=resumable&upload_id=…)")
        return await self._session_request(request)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        bucket, prefix = self._bucket(request)
        session, name = await self._session(request, prefix)
        grant = await self._authorize(request, bucket, prefix, name, "cancel")
        await edge.engine(request).cancel(session, grant)
        if self._md5 is not None:
            self._md5.forget(session)
        # Google answers a cancelled session with 499 and no body.
        return web.Response(status=499, reason="Client Closed Request")

    async def get_bucket(self, request: web.Request) -> web.StreamResponse:
        bucket, _ = self._bucket(request)
        return web.json_response(
            gcs_render.bucket_resource(bucket, base=edge.public_base(request))
        )

    # -- starting uploads -------------------------------------------------

    async def _initiate(self, request: web.Request) -> web.StreamResponse:
        bucket, prefix = self._bucket(request)
        total = parse_length(
            request.headers.get("X-Upload-Content-Length"), "X-Upload-Content-Length"
        )
        # The name may travel in the JSON body, so that small body is read
        # (bounded) before the authorizer is asked; no media byte is.
        meta = await self._metadata_body(request)
        name = self._object_name(request, meta)
        await self._check_preconditions(request, prefix + name)
        grant = await self._authorize(request, bucket, prefix, name, "create")
        content_type = edge.content_type(
            request.headers.get("X-Upload-Content-Type") or meta.content_type,
            "X-Upload-Content-Type",
        )
        upload_id, session = _new_session()
        info = await edge.engine(request).initiate(
            session, total=total, content_type=content_type, metadata=meta.metadata,
            grant=grant, target=prefix + name,
        )
        edge.note_state(request, info)
        location = (
            f"{edge.public_base(request)}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
            f"?uploadType=resumable&upload_id={upload_id}"
        )
        return web.Response(
            status=200, headers={"Location": location, "X-GUploader-UploadID": upload_id}
        )

    async def _media(self, request: web.Request) -> web.StreamResponse:
        bucket, prefix = self._bucket(request)
        name = self._object_name(request, ObjectRequest())
        length = _content_length(request)
        await self._check_preconditions(request, prefix + name)
        grant = await self._authorize(request, bucket, prefix, name, "create")
        content_type = edge.content_type(request.headers.get(hdrs.CONTENT_TYPE), "Content-Type")
        engine = edge.engine(request)
        _, session = _new_session()
        await engine.initiate(
            session, total=length, content_type=content_type, metadata={}, grant=grant,
            target=prefix + name,
        )
        digests = edge.goog_hash_digests(request)
        followed = self._follow(session)
        outcome = None
        try:
            if length == 0:
                outcome = await engine.status(session, 0, grant, digests)
            elif length is not None:
                outcome = await engine.put_chunk(
                    session, Chunk(0, length - 1, length), edge.body_of(request),
                    content_length=length, content_type=None, grant=grant, digests=digests,
                    creates=False, md5_source=_source(followed),
                )
            else:
                outcome = await engine.put_stream(
                    session, 0, edge.body_of(request), total=None, grant=grant,
                    digests=digests, md5_source=_source(followed),
                )
        except UploadError:
            await _discard(request, session, grant)
            raise
        finally:
            _settle(followed, outcome)
        return await self._single_request_answer(request, session, outcome, bucket, prefix)

    async def _multipart(self, request: web.Request) -> web.StreamResponse:
        bucket, prefix = self._bucket(request)
        boundary = multipart_boundary(request.headers.get(hdrs.CONTENT_TYPE))
        body = edge.body_of(request)
        head, rest = await read_multipart_head(body, boundary, MAX_METADATA_BYTES)
        name = self._object_name(request, head.metadata)
        await self._check_preconditions(request, prefix + name)
        grant = await self._authorize(request, bucket, prefix, name, "create")
        content_type = edge.content_type(
            head.metadata.content_type or head.media_type, "contentType"
        )
        digests = _merge_digests(edge.goog_hash_digests(request), head.metadata)
        engine = edge.engine(request)
        _, session = _new_session()
        await engine.initiate(
            session, total=None, content_type=content_type, metadata=head.metadata.metadata,
            grant=grant, target=prefix + name,
        )
        media = MultipartMedia(body, boundary, rest)
        followed = self._follow(session)
        outcome = None
        try:
            outcome = await engine.put_stream(
                session, 0, media, total=None, grant=grant, digests=digests,
                md5_source=_source(followed),
            )
        except UploadError:
            await _discard(request, session, grant)
            raise
        finally:
            _settle(followed, outcome)
        if media.unclosed:
            await _discard(request, session, grant)
            raise BadRequest("the multipart body ended before its closing boundary")
        return await self._single_request_answer(request, session, outcome, bucket, prefix)

    async def _single_request_answer(
        self, request: web.Request, session: str, outcome: Outcome, bucket: str, prefix: str
    ) -> web.StreamResponse:
        edge.note_outcome(request, outcome)
        if not outcome.complete:
            # A one-request upload that did not arrive whole is of no use to
            # anyone: no client can resume a session it never saw.
            await _discard(request, session, None)
            raise BadRequest("the upload body ended early; nothing was stored, send it again")
        return self._object_answer(request, outcome.info, bucket, prefix)

    # -- sessions ---------------------------------------------------------

    async def _session_request(self, request: web.Request) -> web.StreamResponse:
        bucket, prefix = self._bucket(request)
        session, name = await self._session(request, prefix)
        header = request.headers.get(hdrs.CONTENT_RANGE)
        length = _content_length(request)
        if header is not None:
            parsed = parse_session_range(header)
        elif length is not None:
            # No Content-Range: the whole object in this one request.
            parsed = Probe(0) if length == 0 else Chunk(0, length - 1, length)
        else:
            parsed = OpenChunk(0, None)
        engine = edge.engine(request)
        digests = edge.goog_hash_digests(request)
        if isinstance(parsed, Probe):
            if length is None or length > 0:
                raise BadRequest("a status query ('bytes */...') must have an empty body")
            grant = await self._authorize(request, bucket, prefix, name, "status")
            outcome = await engine.status(session, parsed.total, grant, digests)
            return self._session_answer(request, outcome, bucket, prefix)
        grant = await self._authorize(request, bucket, prefix, name, "append")
        followed = self._follow(session)
        outcome = None
        try:
            if isinstance(parsed, Chunk):
                outcome = await engine.put_chunk(
                    session, parsed, edge.body_of(request), content_length=length,
                    content_type=None, grant=grant, digests=digests, creates=False,
                    md5_source=_source(followed),
                )
            else:
                outcome = await engine.put_stream(
                    session, parsed.start, edge.body_of(request), total=parsed.total,
                    grant=grant, digests=digests, md5_source=_source(followed),
                )
        finally:
            _settle(followed, outcome)
        return self._session_answer(request, outcome, bucket, prefix)

    def _session_answer(
        self, request: web.Request, outcome: Outcome, bucket: str, prefix: str
    ) -> web.StreamResponse:
        edge.note_outcome(request, outcome)
        if outcome.complete:
            return self._object_answer(request, outcome.info, bucket, prefix)
        headers = {}
        rng = format_range(outcome.info.offset)
        if rng is not None:
            headers["Range"] = rng
        if request.headers.get("X-GUploader-No-308", "").lower() == "yes":
            # Clients whose HTTP stack reads a bare 308 as a redirect ask for this.
            headers["X-Http-Status-Code-Override"] = "308"
            return web.Response(status=200, headers=headers)
        return web.Response(status=308, reason="Resume Incomplete", headers=headers)

    def _object_answer(
        self, request: web.Request, info: UploadInfo, bucket: str, prefix: str
    ) -> web.StreamResponse:
        name = info.object_name.removeprefix(prefix)
        doc = gcs_render.object_resource(
            info, bucket=bucket, name=name, base=edge.public_base(request)
        )
        return web.json_response(doc, status=200)

    async def _session(self, request: web.Request, prefix: str) -> tuple[str, str]:
        """The id session a URL names and its object's name within the bucket."""
        try:
            session = id_session_name(NAME, request.query["upload_id"])
        except InvalidName:
            raise UploadNotFound("no upload session has this upload_id") from None
        info = await edge.engine(request).lookup(session)
        target = info.object_name
        if not target.startswith(prefix):
            raise UploadNotFound("no upload session has this upload_id in this bucket")
        return session, target.removeprefix(prefix)

    # -- shared steps -----------------------------------------------------

    def _bucket(self, request: web.Request) -> tuple[str, str]:
        bucket = request.match_info["bucket"]
        prefix = self._buckets.get(bucket)
        if prefix is None:
            raise UploadNotFound(f"the bucket {bucket!r} does not exist here (see gcs.buckets)")
        return bucket, prefix

    @staticmethod
    def _object_name(request: web.Request, meta: ObjectRequest) -> str:
        name = request.query.get("name") or meta.name
        if not name:
            raise BadRequest("the object name is missing: send ?name= or a JSON 'name'")
        return validate_name(name)

    @staticmethod
    async def _metadata_body(request: web.Request) -> ObjectRequest:
        if not request.can_read_body:
            return ObjectRequest()
        raw = await read_small_body(request, MAX_METADATA_BYTES, "object metadata")
        return parse_object_json(raw)

    @staticmethod
    async def _authorize(
        request: web.Request, bucket: str, prefix: str, name: str, action: Action
    ) -> Grant:
        validate_name(prefix + name)
        return await edge.authorize(
            request, name, action,
            dialect=NAME, extra={"bucket": bucket}, stored_as=prefix + name,
        )

    @staticmethod
    async def _check_preconditions(request: web.Request, stored_name: str) -> None:
        value = request.query.get("ifGenerationMatch")
        if value is None:
            return
        if value != "0":
            raise BadRequest("only ifGenerationMatch=0 (the object must not exist) is supported")
        store = request.app[keys.STORE]
        if not isinstance(store, ObjectLookup):
            raise BadRequest(
                "ifGenerationMatch=0 needs a store that can tell whether an object exists, "
                "and the configured one cannot; leave the precondition out"
            )
        if await store.object_exists(stored_name):
            raise ConditionNotMet("the object already exists (ifGenerationMatch=0)")

    def _follow(self, session: str) -> FollowedRequest | None:
        return None if self._md5 is None else self._md5.request(session)


def _new_session() -> tuple[str, str]:
    # 192 random bits: the id alone grants write access to the session.
    upload_id = secrets.token_urlsafe(24)
    return upload_id, id_session_name(NAME, upload_id)


def _content_length(request: web.Request) -> int | None:
    length = parse_length(request.headers.get(hdrs.CONTENT_LENGTH), "Content-Length")
    if length is None and not request.body_exists:
        return 0
    return length


def _merge_digests(header: ClientDigests | None, meta: ObjectRequest) -> ClientDigests | None:
    crc32c = header.crc32c if header is not None and header.crc32c is not None else meta.crc32c
    md5 = header.md5 if header is not None and header.md5 is not None else meta.md5
    return None if crc32c is None and md5 is None else ClientDigests(crc32c=crc32c, md5=md5)


def _source(followed: FollowedRequest | None) -> Md5Source | None:
    return None if followed is None else followed.source


def _settle(followed: FollowedRequest | None, outcome: Outcome | None) -> None:
    if followed is not None:
        followed.settle(outcome)


async def _discard(request: web.Request, session: str, grant: Grant | None) -> None:
    """Drop a one-request session that did not complete (the cleanup job
    would, later; nobody can resume a session whose id it never saw)."""
    try:
        await edge.engine(request).cancel(session, grant or Grant())
    except UploadError:
        pass
