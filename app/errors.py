"""One exception tree for the whole service.

Every error the service raises on purpose is an ``UploadError``. Each subclass
knows the HTTP status it maps to and a stable machine-readable ``code``; the
server middleware turns any of them into ``{"error": code, "message": text}``.
Lower-layer errors (botocore, OS, aiohttp client) are translated into this tree
at the module that talks to them, so nothing above a store or the auth client
ever sees them::

    UploadError
    ├── BadRequest (400)
    │   ├── InvalidName
    │   ├── InvalidContentRange
    │   ├── LengthMismatch
    │   ├── TotalMismatch
    │   ├── DigestMismatch        the whole object's digest
    │   └── ChecksumMismatch      one request body's digest (nothing stored)
    ├── Unauthorized (401)        auth webhook refused
    ├── Forbidden (403)           auth webhook refused / owner mismatch
    ├── AuthRefused (any 4xx the webhook chose)
    ├── UploadNotFound (404)      never created, cancelled or expired
    │   └── UploadExpired         idle past storage.upload_ttl (tus: 410)
    ├── OffsetMismatch (409)      chunk starts after the stored offset
    ├── TooLarge (413)
    ├── StorageRefused (400)      the backend refuses the request for good
    ├── StorageMisconfigured (500, no Retry-After)  the operator must act
    └── Unavailable (503, Retry-After)
        ├── StorageUnavailable    store backend down or failing
        ├── AuthUnavailable       auth webhook down, slow or answering garbage
        ├── WriterBusy            the previous writer did not let go in time
        └── Overloaded            no memory for the request within storage.budget_wait
"""

from __future__ import annotations

from typing import Any


class UploadError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(UploadError):
    status = 400
    code = "bad_request"


class InvalidName(BadRequest):
    code = "invalid_name"


class InvalidContentRange(BadRequest):
    code = "invalid_content_range"


class LengthMismatch(BadRequest):
    code = "length_mismatch"


class TotalMismatch(BadRequest):
    code = "total_mismatch"


class DigestMismatch(BadRequest):
    code = "digest_mismatch"


class ChecksumMismatch(BadRequest):
    """One request's body did not match the checksum it came with; none of it
    was stored (tus renders this as 460)."""

    code = "checksum_mismatch"


class Unauthorized(UploadError):
    status = 401
    code = "unauthorized"


class Forbidden(UploadError):
    status = 403
    code = "forbidden"


class AuthRefused(UploadError):
    """The auth webhook refused with a 4xx that is passed on unchanged."""

    code = "refused"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UploadNotFound(UploadError):
    status = 404
    code = "not_found"


class UploadExpired(UploadNotFound):
    """The upload existed but stayed idle past ``storage.upload_ttl``. Its code
    stays ``not_found`` (our dialect's contract); tus answers 410 for it."""


class OffsetMismatch(UploadError):
    """A write started somewhere other than the stored offset.

    ``offset`` is the number of bytes durably stored, so the HTTP layer can
    answer with the true ``Range``.
    """

    status = 409
    code = "offset_mismatch"

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(message, expected_offset=offset)
        self.offset = offset

    def headers(self) -> dict[str, str]:
        # Same shape as a 308's Range, so clients can resume from the answer.
        return {"Range": f"bytes=0-{self.offset - 1}"} if self.offset > 0 else {}


class TooLarge(UploadError):
    status = 413
    code = "too_large"


class StorageRefused(BadRequest):
    """The storage backend refused the request as invalid (S3
    ``InvalidArgument``, ``InvalidRequest``, ...): resending it unchanged
    fails the same way, so it must not look transient."""

    code = "storage_refused"


class StorageMisconfigured(UploadError):
    """The storage backend refuses the service itself (no such bucket, access
    denied, bad credentials). Not the client's fault, and not transient either:
    no ``Retry-After``; it lasts until the operator fixes the configuration."""

    status = 500
    code = "storage_misconfigured"


class Unavailable(UploadError):
    status = 503
    code = "unavailable"
    retry_after: int = 5

    def __init__(self, message: str, *, retry_after: int | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        if retry_after is not None:
            self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class StorageUnavailable(Unavailable):
    code = "storage_unavailable"


class AuthUnavailable(Unavailable):
    code = "auth_unavailable"


class WriterBusy(Unavailable):
    code = "writer_busy"
    retry_after = 2


class Overloaded(Unavailable):
    """The memory budget (``storage.memory_budget``) stayed in use by other
    requests for longer than ``storage.budget_wait``. What the request had
    delivered before is kept: the client probes and resumes."""

    code = "overloaded"
