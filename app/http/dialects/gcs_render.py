"""What Google's clients parse: the object and bucket resources and the
JSON API's error shape. Pure functions of the upload state, table-tested."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from app.core.digests import crc32c_b64, md5_b64
from app.core.model import UploadInfo
from app.errors import UploadError

#: The JSON API's ``reason`` for each status this service answers with.
_REASONS = {
    400: "invalid",
    401: "required",
    403: "forbidden",
    404: "notFound",
    409: "conflict",
    412: "conditionNotMet",
    413: "uploadTooLarge",
    503: "backendError",
}


def error_body(status: int, message: str, reason: str | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message", "errors": [{"reason", "message", "domain"}]}}``."""
    reason = reason or _REASONS.get(status, "invalid" if status < 500 else "backendError")
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"reason": reason, "message": message, "domain": "global"}],
        }
    }


def error_of(error: UploadError) -> dict[str, Any]:
    return error_body(error.status, error.message, getattr(error, "reason", None))


def rfc3339(when: float) -> str:
    stamp = datetime.fromtimestamp(when, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def generation(info: UploadInfo) -> str:
    """GCS generations are microsecond timestamps of the write; the completion
    time is durable in the session record, so repeat answers agree."""
    assert info.completed is not None
    return str(int(info.completed.completed_at * 1_000_000))


def object_resource(
    info: UploadInfo, *, bucket: str, name: str, base: str
) -> dict[str, Any]:
    """The ``storage#object`` a completed upload became, as the JSON API
    renders it: sizes and generations are strings there."""
    done = info.completed
    assert done is not None
    gen = generation(info)
    quoted = quote(name, safe="")
    when = rfc3339(done.completed_at)
    body: dict[str, Any] = {
        "kind": "storage#object",
        "id": f"{bucket}/{name}/{gen}",
        "selfLink": f"{base}/storage/v1/b/{quote(bucket, safe='')}/o/{quoted}",
        "mediaLink": (
            f"{base}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quoted}"
            f"?generation={gen}&alt=media"
        ),
        "name": name,
        "bucket": bucket,
        "generation": gen,
        "metageneration": "1",
        "contentType": info.content_type,
        "storageClass": "STANDARD",
        "size": str(done.size),
        "crc32c": crc32c_b64(done.crc32c),
        "etag": _etag(gen),
        "timeCreated": when,
        "updated": when,
        "timeStorageClassUpdated": when,
        "timeFinalized": when,
    }
    if done.md5 is not None:
        body["md5Hash"] = md5_b64(done.md5)
    if info.metadata:
        body["metadata"] = dict(info.metadata)
    return body


def _etag(gen: str) -> str:
    # GCS's object etag is an opaque base64 token that changes with every
    # generation; the store's own etag (an S3 part hash) is kept out of it.
    return base64.b64encode(int(gen).to_bytes(8, "big")).decode("ascii").rstrip("=")


def bucket_resource(bucket: str, *, base: str) -> dict[str, Any]:
    """A minimal ``storage#bucket``: google-cloud-storage asks for it, and
    only the identity fields matter to it."""
    epoch = rfc3339(0)
    return {
        "kind": "storage#bucket",
        "id": bucket,
        "selfLink": f"{base}/storage/v1/b/{quote(bucket, safe='')}",
        "name": bucket,
        "projectNumber": "0",
        "metageneration": "1",
        "location": "US",
        "locationType": "multi-region",
        "storageClass": "STANDARD",
        "etag": "CAE=",
        "timeCreated": epoch,
        "updated": epoch,
    }
