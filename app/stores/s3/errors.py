"""S3 store errors: which S3 error codes mean what, ``S3Refusal`` for the codes
a caller handles itself, and turning S3 failures into ``app.errors`` types.

Every S3 call goes through ``s3_errors`` (in ``S3Client.call``), the one
boundary where botocore and aiohttp exceptions become ``StorageUnavailable``
or an ``S3Refusal`` the calling collaborator handles; nothing from botocore
leaves the S3 store.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from app.errors import (
    InvalidName,
    StorageMisconfigured,
    StorageRefused,
    StorageUnavailable,
    TooLarge,
    UploadError,
    UploadNotFound,
)

log = logging.getLogger("app.stores.s3")

TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError)
CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
NO_UPLOAD_CODES = frozenset({"NoSuchUpload"})
#: CompleteMultipartUpload: a listed part is missing or has another ETag.
INVALID_PART_CODES = frozenset({"InvalidPart"})
#: Providers without conditional deletes answer DeleteObject + If-Match so.
UNSUPPORTED_CODES = frozenset({"NotImplemented", "501"})
#: S3 refusals of the request itself: resending it can never succeed (400).
REFUSED_CODES = frozenset({
    "InvalidArgument", "InvalidRequest", "MetadataTooLarge", "InvalidPartOrder",
    "InvalidStorageClass", "InvalidTag", "MalformedXML", "InvalidObjectState",
})
#: S3 refusals of the service's configuration (bucket, credentials, policy):
#: nothing a client does helps, and waiting does not either (500).
MISCONFIGURED_CODES = frozenset({
    "AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AllAccessDisabled", "AccountProblem", "InvalidBucketName", "PermanentRedirect",
    "AuthorizationHeaderMalformed", "InvalidBucketState", "NotSignedUp", "InvalidToken",
    "InvalidSecurity", "403", "301",
})
#: Anything else (throttling such as SlowDown/RequestLimitExceeded, 5xx,
#: RequestTimeout, ExpiredToken, unknown codes) is treated as transient: a
#: 503 + Retry-After, which is what S3 itself asks of its clients.


class S3Refusal(Exception):
    """A ClientError whose code the caller asked to handle itself. Every call
    site that asks for one catches it, so it never leaves the S3 store."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation}: {code}")
        self.operation = operation
        self.code = code
        self.message = message


def translate(exc: BaseException, name: str) -> UploadError:
    """The ``UploadError`` a failed write of ``name`` reports for ``exc``."""
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, S3Refusal) and exc.code in NO_UPLOAD_CODES:
        return UploadNotFound(f"the multipart upload of {name!r} no longer exists")
    if isinstance(exc, S3Refusal):
        return StorageUnavailable(f"S3 {exc.operation} failed: {exc.code}: {exc.message}")
    log.error("unexpected failure writing %r: %r", name, exc)
    return StorageUnavailable(f"storing {name!r} failed: {type(exc).__name__}")


def transport_reason(exc: BaseException) -> str:
    """A client-safe reason for a transport failure (no endpoint, no key)."""
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError
                  | aiohttp.ClientConnectorError):
        return "cannot connect to S3"
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return "S3 did not answer in time"
    if isinstance(exc, ConnectionClosedError | aiohttp.ServerDisconnectedError
                  | aiohttp.ClientPayloadError | ConnectionError):
        return "the connection to S3 was cut"
    return type(exc).__name__


def classify(operation: str, code: str, status: object, message: str) -> UploadError:
    """The ``app.errors`` type of an S3 error answer: permanent refusals must
    never pass for an outage, or clients resend them forever."""
    if code == "KeyTooLongError":
        return InvalidName(f"the object key is longer than S3 allows: {message}")
    if code == "EntityTooLarge":
        return TooLarge(f"S3 refused the data as too large: {message}")
    text = f"S3 {operation} failed: {code}: {message}"
    if isinstance(status, int) and status >= 500:
        return StorageUnavailable(text)
    if code in REFUSED_CODES:
        return StorageRefused(f"{text}; resending the same request cannot succeed")
    if code in MISCONFIGURED_CODES:
        return StorageMisconfigured(
            f"{text}; the service's storage configuration must be fixed by its operator"
        )
    return StorageUnavailable(text)


@asynccontextmanager
async def s3_errors(operation: str, handled: Collection[str] = ()) -> AsyncIterator[None]:
    """Turn botocore/aiohttp failures into ``StorageUnavailable`` (or
    ``S3Refusal`` for the error codes the caller handles itself)."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "Unknown"
        message = str(error.get("Message", "")) or "no message"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in handled or str(status) in handled:
            raise S3Refusal(operation, code if code in handled else str(status),
                            message) from None
        log.warning("S3 %s failed: %s (HTTP %s): %s", operation, code, status, message)
        raise classify(operation, code, status, message) from None
    except TRANSPORT_ERRORS as exc:
        log.warning("S3 %s failed: %s: %s", operation, type(exc).__name__, exc)
        # The text of these errors holds the endpoint URL and key: logs only.
        raise StorageUnavailable(f"S3 {operation} failed: {transport_reason(exc)}") from None
