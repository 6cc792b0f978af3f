"""The S3 store's one way to S3: ``S3Client`` wraps an aiobotocore client for
one bucket, runs every call through the error boundary of ``errors.py``, and
offers the few composite operations the store's collaborators share (whole
bodies, paged listings, batched deletes, part listings). It knows nothing of
sessions or records.

``observe_client_calls`` measures calls with botocore's event hooks (S3
plumbing, so it lives here); what is done with the measurements is the
``CallObserver``'s business (``app.ops.metrics`` feeds Prometheus).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Collection
from contextlib import AsyncExitStack, aclosing
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from app.config import StorageConfig
from app.errors import StorageUnavailable, UploadError
from app.stores.base import CallObserver
from app.stores.s3.errors import (
    MISSING_KEY_CODES,
    NO_UPLOAD_CODES,
    TRANSPORT_ERRORS,
    S3Refusal,
    s3_errors,
)

log = logging.getLogger("app.stores.s3")

_DELETE_BATCH = 1000
_CAMEL_WORD = re.compile(r"(?<!^)(?=[A-Z])")


class S3Client:
    """S3 calls on one bucket; failures come out as ``app.errors`` types, or
    as ``S3Refusal`` for the error codes a caller names in ``handled``."""

    def __init__(self, client: Any, bucket: str, stack: AsyncExitStack | None = None) -> None:
        self._client = client
        self.bucket = bucket
        self._stack = stack

    @classmethod
    async def connect(cls, config: StorageConfig) -> S3Client:
        s3 = config.s3
        if not s3.bucket:
            raise StorageUnavailable("S3 store: no bucket configured (storage.s3.bucket)")
        boto_config = AioConfig(
            region_name=s3.region,
            s3={"addressing_style": s3.addressing_style,
                "payload_signing_enabled": s3.payload_signing},
            request_checksum_calculation=s3.checksum_mode,
            response_checksum_validation=s3.checksum_mode,
            connect_timeout=s3.connect_timeout,
            read_timeout=s3.read_timeout,
            retries={"max_attempts": s3.max_attempts, "mode": "standard"},
            # Many uploads each run parts_in_flight part uploads plus record and
            # staged requests; a small pool would queue them behind each other.
            max_pool_connections=max(64, 8 * config.parts_in_flight),
        )
        stack = AsyncExitStack()
        try:
            # Credentials come from the standard AWS chain only (env, profile, role).
            client = await stack.enter_async_context(
                get_session().create_client("s3", endpoint_url=s3.endpoint_url, config=boto_config)
            )
        except TRANSPORT_ERRORS as exc:
            await stack.aclose()
            raise StorageUnavailable(f"S3 store: cannot create the S3 client: {exc}") from None
        return cls(client, str(s3.bucket), stack)

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()

    @property
    def events(self) -> Any:
        """The botocore event system of the underlying client (for hooks)."""
        return self._client.meta.events

    def observe_calls(self, observer: CallObserver) -> None:
        observe_client_calls(self._client, observer)

    # -- single calls ---------------------------------------------------------

    async def call(
        self, operation: str, handled: Collection[str] = (), /, **params: Any
    ) -> dict[str, Any]:
        """``operation`` (e.g. ``"PutObject"``) on this bucket."""
        method = getattr(self._client, _CAMEL_WORD.sub("_", operation).lower())
        async with s3_errors(operation, handled):
            result: dict[str, Any] = await method(Bucket=self.bucket, **params)
        return result

    async def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """An object's body and ETag; None when it does not exist."""
        try:
            async with s3_errors("GetObject", MISSING_KEY_CODES):
                result = await self._client.get_object(Bucket=self.bucket, Key=key)
                async with result["Body"] as stream:
                    data: bytes = await stream.read()
        except S3Refusal:
            return None
        return data, str(result["ETag"])

    async def read_range(
        self, key: str, first: int, last: int, handled: Collection[str] = (), /,
        *, if_match: str | None = None, chunk_size: int,
    ) -> AsyncIterator[bytes]:
        """Bytes ``[first, last]`` of ``key`` as they arrive, ``chunk_size`` at
        a time, so a large range never sits in memory whole."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                                  "Range": f"bytes={first}-{last}"}
        if if_match is not None:
            params["IfMatch"] = if_match
        async with s3_errors("GetObject", handled):
            result = await self._client.get_object(**params)
            async with result["Body"] as stream:
                while data := await stream.read(chunk_size):
                    yield data

    async def head(self, key: str) -> dict[str, Any] | None:
        """HeadObject's answer; None when the object does not exist."""
        try:
            return await self.call("HeadObject", MISSING_KEY_CODES, Key=key)
        except S3Refusal:
            return None

    async def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort a multipart upload; False when it was gone already."""
        try:
            await self.call("AbortMultipartUpload", NO_UPLOAD_CODES, Key=key, UploadId=upload_id)
        except S3Refusal:
            return False
        return True

    async def ensure_bucket(self, region: str) -> None:
        try:
            await self.call("HeadBucket", {"404", "NoSuchBucket", "NotFound"})
            return
        except S3Refusal:
            pass
        params: dict[str, Any] = {}
        if region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await self.call("CreateBucket", {"BucketAlreadyOwnedByYou"}, **params)
            log.info("created bucket %s", self.bucket)
        except S3Refusal:
            pass  # created by another instance meanwhile

    # -- multipart uploads ------------------------------------------------------

    async def parts(self, key: str, upload_id: str) -> dict[int, dict[str, Any]]:
        """Every uploaded part by number (ListParts pages at 1,000);
        ``S3Refusal`` when the multipart upload does not exist."""
        parts: dict[int, dict[str, Any]] = {}
        marker = 0
        while True:
            page = await self.call("ListParts", NO_UPLOAD_CODES, Key=key, UploadId=upload_id,
                                   PartNumberMarker=marker)
            for part in page.get("Parts", []):
                parts[int(part["PartNumber"])] = part
            if not page.get("IsTruncated"):
                return parts
            marker = int(page["NextPartNumberMarker"])

    async def upload_size(self, key: str, upload_id: str) -> int | None:
        """Bytes in a multipart upload's parts; None if it no longer exists."""
        try:
            parts = await self.parts(key, upload_id)
        except S3Refusal:
            return None
        return sum(int(part.get("Size", 0)) for part in parts.values())

    # -- listings and deletes -------------------------------------------------------

    async def list_objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        """ListObjectsV2 entries (Key, Size, LastModified, ...) under ``prefix``."""
        params: dict[str, Any] = {"Prefix": prefix}
        while True:
            page = await self.call("ListObjectsV2", **params)
            for item in page.get("Contents", []):
                yield item
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token or token == params.get("ContinuationToken"):
                # Stopping here would pass a partial listing off as complete,
                # and an orphan sweep would take what it missed for garbage.
                raise StorageUnavailable("S3 ListObjectsV2 returned no usable continuation")
            params["ContinuationToken"] = token

    async def list_keys(self, prefix: str) -> AsyncIterator[str]:
        async with aclosing(self.list_objects(prefix)) as items:
            async for item in items:
                yield str(item["Key"])

    async def delete_keys(self, keys: list[str], *, quiet: bool) -> None:
        """Delete ``keys`` in batches; with ``quiet``, failures are only logged
        (what is left is garbage the cleanup job sweeps)."""
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            try:
                result = await self.call(
                    "DeleteObjects",
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except UploadError:
                if quiet:
                    return
                raise
            errors = result.get("Errors") or []
            if errors:
                log.warning("S3 DeleteObjects left %d keys, first: %s", len(errors), errors[0])
                if not quiet:
                    raise StorageUnavailable(
                        f"S3 DeleteObjects failed for {len(errors)} keys: "
                        f"{errors[0].get('Code')}"
                    )

    async def delete_prefix(self, prefix: str, *, quiet: bool) -> None:
        try:
            keys = [key async for key in self.list_keys(prefix)]
        except UploadError:
            if quiet:
                return
            raise
        await self.delete_keys(keys, quiet=quiet)


def observe_client_calls(client: Any, observer: CallObserver) -> None:
    """Report every S3 API call of ``client`` (an aiobotocore or botocore S3
    client) to ``observer``: its duration, and its error code or, for
    transport failures, the exception's class name.

    botocore emits ``before-call.s3.<Op>`` before the first attempt,
    ``after-call.s3.<Op>`` once a response was parsed (including error
    responses such as 404/412, after retries), and ``after-call-error.s3.<Op>``
    when no response came at all (connection refused, timeouts), also after
    retries. Observing a client twice with the same observer has no further
    effect.
    """
    events = client.meta.events
    # botocore hands the before-call, after-call and after-call-error events of
    # one API call the same context dict; keys unique to this observer let two
    # observers share one client without stealing each other's start times.
    tag = f"upload-proxy-calls-{id(observer)}"
    started_key, operation_key = f"{tag}-started", f"{tag}-operation"

    def before_call(context: dict[str, Any], model: Any, **_: Any) -> None:
        context[started_key] = time.perf_counter()
        context[operation_key] = model.name

    def after_call(
        http_response: Any, parsed: dict[str, Any], model: Any, context: dict[str, Any],
        **_: Any,
    ) -> None:
        error = None
        status = getattr(http_response, "status_code", 200)
        if status >= 300:
            error = str((parsed.get("Error") or {}).get("Code") or status)
        _report(context, model.name, error)

    def after_call_error(exception: BaseException, context: dict[str, Any], **_: Any) -> None:
        _report(context, str(context.get(operation_key, "unknown")), type(exception).__name__)

    def _report(context: dict[str, Any], operation: str, error: str | None) -> None:
        started = context.pop(started_key, None)
        if started is not None:
            observer(operation, time.perf_counter() - started, error)

    events.register("before-call.s3", before_call, unique_id=f"{tag}-before")
    events.register("after-call.s3", after_call, unique_id=f"{tag}-after")
    events.register("after-call-error.s3", after_call_error, unique_id=f"{tag}-error")
