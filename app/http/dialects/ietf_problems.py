"""The IETF draft dialect's errors as RFC 9457 problem documents, with the
problem types the draft defines (``mismatching-upload-offset``,
``inconsistent-upload-length``, ``completed-upload``) where one applies, and
our error ``code`` as an extension member for everything else."""

from __future__ import annotations

import http
from typing import Any

from aiohttp import web

from app.core import ietf_versions as iv
from app.errors import (
    BadRequest,
    DigestMismatch,
    OffsetMismatch,
    TooLarge,
    TotalMismatch,
    UploadError,
)

PROBLEM_JSON = "application/problem+json"


class UnsupportedPatch(BadRequest):
    status = 415
    code = "unsupported_media_type"

    def headers(self) -> dict[str, str]:
        return {"Accept-Patch": iv.PARTIAL_UPLOAD}


class CompletedUpload(BadRequest):
    code = "completed_upload"


class ProvidedOffsetMismatch(OffsetMismatch):
    """An append's ``Upload-Offset`` is not the upload's offset."""

    def __init__(self, error: OffsetMismatch, provided: int) -> None:
        super().__init__(error.message, offset=error.offset)
        self.provided = provided


class FieldProblem(BadRequest):
    code = "invalid_field"


class LengthProblem(BadRequest):
    code = "inconsistent_length"


def problem_response(
    error: UploadError, version: iv.InteropVersion, limits: iv.UploadLimits | None = None
) -> web.Response:
    """``error`` as an RFC 9457 problem document, with the draft's types where
    it defines one. ``Upload-Complete: ?0`` says the answer comes from the
    upload resource, except for a whole-object digest mismatch, which ends the
    upload: ``?1`` tells the client not to resume it."""
    try:
        phrase = http.HTTPStatus(error.status).phrase
    except ValueError:
        phrase = "Error"
    doc: dict[str, Any] = {
        "type": "about:blank", "title": phrase, "status": error.status,
        "detail": error.message, "code": error.code,
    }
    headers = {k: v for k, v in error.headers().items() if k != "Range"}
    if isinstance(error, OffsetMismatch):
        doc["type"] = iv.MISMATCHING_OFFSET
        doc["title"] = "offset from request does not match offset of resource"
        doc["expected-offset"] = error.offset
        if isinstance(error, ProvidedOffsetMismatch):
            doc["provided-offset"] = error.provided
        headers["Upload-Offset"] = str(error.offset)
    elif isinstance(error, TotalMismatch | LengthProblem):
        doc["type"] = iv.INCONSISTENT_LENGTH
        doc["title"] = "inconsistent length values for upload"
        offset = error.details.get("offset")
        if isinstance(offset, int):
            headers["Upload-Offset"] = str(offset)
    elif isinstance(error, CompletedUpload):
        doc["type"] = iv.COMPLETED_UPLOAD
        doc["title"] = "upload is already completed"
    if isinstance(error, TooLarge) and limits is not None and version.has_limits:
        headers["Upload-Limit"] = limits.header(version)
    headers.update(version.complete_headers(isinstance(error, DigestMismatch)))
    return web.json_response(doc, status=error.status, headers=headers,
                             content_type=PROBLEM_JSON)
