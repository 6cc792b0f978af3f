"""Markers: how the orphan sweep knows a multipart upload is this service's.

ListMultipartUploads returns no metadata or tags, only key, upload id and
initiation time, and other applications may keep multipart uploads under the
same prefix (with prefix ``""``, anywhere in the bucket). So ``create`` writes
a small marker object *before* CreateMultipartUpload::

    {prefix}.uploads/markers/{sha256(object key)}/{session id}

and a multipart upload counts as ours only if a marker for its key was
written shortly before it was initiated (both times are S3's own clocks, so
no skew between hosts matters). An upload without one is never swept, which
with prefix ``""`` also means no unmarked upload is ever swept. The marker goes
when its session's multipart upload does (finish, cancel, replace, sweep).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime

from app.errors import UploadError
from app.stores.s3.client import S3Client
from app.stores.s3.records import Layout

#: S3 initiates an upload at most this long after its marker was written: the
#: create's CreateMultipartUpload, retries and timeouts included, follows at once.
MARK_WINDOW = 15 * 60.0
#: LastModified of a HEAD has whole seconds; a listing's may have milliseconds.
_CLOCK_SLACK = 2.0


@dataclass(frozen=True)
class Marker:
    key: str
    session_id: str
    written: float


class Markers:
    def __init__(self, client: S3Client, layout: Layout) -> None:
        self._client = client
        self._layout = layout

    def root(self) -> str:
        return f"{self._layout.reserved}markers/"

    def _dir(self, object_key: str) -> str:
        digest = hashlib.sha256(object_key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.root()}{digest}/"

    def key(self, object_key: str, session_id: str) -> str:
        return f"{self._dir(object_key)}{session_id}"

    async def write(self, object_key: str, session_id: str) -> None:
        body = json.dumps({"key": object_key, "session_id": session_id}).encode("ascii")
        await self._client.call("PutObject", Key=self.key(object_key, session_id), Body=body,
                                ContentType="application/json")

    async def delete(self, object_key: str, session_id: str) -> None:
        """Remove a session's marker (failures only logged: a stray marker is
        a few bytes, and it never makes a foreign upload look like ours)."""
        try:
            await self._client.delete_keys([self.key(object_key, session_id)], quiet=True)
        except UploadError:
            pass

    async def index(self) -> dict[str, list[Marker]]:
        """Every marker, by the directory of the object key it marks."""
        found: dict[str, list[Marker]] = defaultdict(list)
        async with aclosing(self._client.list_objects(self.root())) as items:
            async for item in items:
                key = str(item["Key"])
                directory, _, session_id = key.rpartition("/")
                found[f"{directory}/"].append(Marker(key, session_id, _when(item)))
        return found

    def marking(self, markers: dict[str, list[Marker]], object_key: str,
                initiated: float) -> Marker | None:
        """The marker that makes the upload at ``object_key`` initiated at
        ``initiated`` ours; None if there is none."""
        for marker in markers.get(self._dir(object_key), []):
            if marker.written - _CLOCK_SLACK <= initiated <= marker.written + MARK_WINDOW:
                return marker
        return None

    async def still_marks(self, marker_key: str, initiated: float) -> bool:
        """Whether ``marker_key`` still exists and marks an upload initiated then."""
        head = await self._client.head(marker_key)
        if head is None:
            return False
        written = _when(head)
        return written - _CLOCK_SLACK <= initiated <= written + MARK_WINDOW + _CLOCK_SLACK


def _when(item: dict[str, object]) -> float:
    value = item.get("LastModified")
    return value.timestamp() if isinstance(value, datetime) else float("-inf")
