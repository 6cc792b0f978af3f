"""S3 store errors: which S3 error codes mean what, ``_S3Refusal`` for the
codes a caller handles itself, and turning failures into ``UploadError``s."""

from __future__ import annotations

import logging

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from app.errors import StorageUnavailable, UploadError, UploadNotFound

log = logging.getLogger("app.stores.s3")

_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError)
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_NO_UPLOAD_CODES = frozenset({"NoSuchUpload"})
#: Providers without conditional deletes answer DeleteObject + If-Match so.
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "501"})


class _S3Refusal(Exception):
    """A ClientError whose code the caller asked to handle itself. Private: every
    call site catches it, so it never leaves this module."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation}: {code}")
        self.operation = operation
        self.code = code
        self.message = message


def _translate(exc: BaseException, name: str) -> UploadError:
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, _S3Refusal) and exc.code in _NO_UPLOAD_CODES:
        return UploadNotFound(f"the multipart upload of {name!r} no longer exists")
    if isinstance(exc, _S3Refusal):
        return StorageUnavailable(f"S3 {exc.operation} failed: {exc.code}: {exc.message}")
    log.error("unexpected failure writing %r: %r", name, exc)
    return StorageUnavailable(f"storing {name!r} failed: {type(exc).__name__}")


def _transport_reason(exc: BaseException) -> str:
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError
                  | aiohttp.ClientConnectorError):
        return "cannot connect to S3"
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return "S3 did not answer in time"
    if isinstance(exc, ConnectionClosedError | aiohttp.ServerDisconnectedError
                  | aiohttp.ClientPayloadError | ConnectionError):
        return "the connection to S3 was cut"
    return type(exc).__name__
