"""The session model: an upload's durable state and its JSON form.

Every store keeps these same fields; the JSON forms here are what both the
filesystem sidecars and the S3 session records hold, so the two can never
drift apart.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompletedObject:
    """Where a finished upload ended up, and its digests."""

    key: str
    #: Bucket for S3; the store's root directory for the filesystem store.
    bucket: str
    size: int
    etag: str
    crc32c: int
    completed_at: float
    #: Raw MD5 of the object, only when the caller could compute it correctly.
    md5: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form for the stores' session records."""
        doc: dict[str, Any] = dataclasses.asdict(self)
        doc["md5"] = None if self.md5 is None else base64.b64encode(self.md5).decode("ascii")
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CompletedObject:
        return cls(
            key=str(doc["key"]),
            bucket=str(doc["bucket"]),
            size=int(doc["size"]),
            etag=str(doc["etag"]),
            crc32c=int(doc["crc32c"]),
            completed_at=float(doc["completed_at"]),
            md5=None if doc.get("md5") is None else base64.b64decode(doc["md5"]),
        )


@dataclass(frozen=True)
class UploadInfo:
    """A snapshot of one upload's durable state."""

    name: str
    #: Unique per upload attempt: a replaced upload of the same name gets a new one.
    session_id: str
    #: Bytes durably stored, counted from the start of the object.
    offset: int
    #: Declared size of the whole object; None while unknown.
    total: int | None
    #: Part size P (all parts but the last have this size): chosen at
    #: creation, settled by the first write that stores bytes, fixed after.
    part_size: int
    #: CRC32C of bytes [0, offset).
    crc32c: int
    content_type: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    owner: str | None = None
    #: Unix times of creation and of the last durable change (last activity).
    created_at: float = 0.0
    updated_at: float = 0.0
    #: Set once the upload is finished.
    completed: CompletedObject | None = None
    #: Opaque store token for optimistic concurrency; callers pass it back untouched.
    version: str | None = None
    #: The object's name when the session has a name of its own (sessions
    #: addressed by an upload id); None: the object is ``name``.
    target: str | None = None
    #: The completion callback of this session is not confirmed yet. Set by the
    #: store in the same record write that completes the upload (S3: already
    #: just before it), cleared once the receiver answered 2xx, so the intent to
    #: notify survives any failure or crash after completion.
    notify_pending: bool = False

    @property
    def is_complete(self) -> bool:
        return self.completed is not None

    @property
    def object_name(self) -> str:
        """Where the finished object goes."""
        return self.name if self.target is None else self.target

    def to_json(self) -> dict[str, Any]:
        """The durable fields in a JSON-safe form, for the stores' session
        records (``version`` is the store's, never stored)."""
        return {
            "name": self.name,
            "session_id": self.session_id,
            "offset": self.offset,
            "total": self.total,
            "part_size": self.part_size,
            "crc32c": self.crc32c,
            "content_type": self.content_type,
            "metadata": dict(self.metadata),
            "owner": self.owner,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "completed": None if self.completed is None else self.completed.to_json(),
            "target": self.target,
            "notify_pending": self.notify_pending,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], version: str | None = None) -> UploadInfo:
        """Inverse of ``to_json``; raises KeyError/TypeError/ValueError on a damaged record."""
        total, owner, done = doc["total"], doc.get("owner"), doc.get("completed")
        target = doc.get("target")
        return cls(
            name=str(doc["name"]),
            session_id=str(doc["session_id"]),
            offset=int(doc["offset"]),
            total=None if total is None else int(total),
            part_size=int(doc["part_size"]),
            crc32c=int(doc["crc32c"]),
            content_type=str(doc["content_type"]),
            metadata={str(k): str(v) for k, v in doc.get("metadata", {}).items()},
            owner=None if owner is None else str(owner),
            created_at=float(doc["created_at"]),
            updated_at=float(doc["updated_at"]),
            completed=None if done is None else CompletedObject.from_json(done),
            version=version,
            target=None if target is None else str(target),
            notify_pending=bool(doc.get("notify_pending", False)),
        )


@dataclass(frozen=True)
class PendingCallback:
    """A completion callback recorded before the client's answer, kept until
    the receiver confirmed it."""

    callback_id: str
    payload: bytes
    saved_at: float

    def to_json(self) -> bytes:
        doc = {
            "id": self.callback_id,
            "payload": base64.b64encode(bytes(self.payload)).decode("ascii"),
            "saved_at": self.saved_at,
        }
        return json.dumps(doc).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> PendingCallback:
        """Raises ValueError/KeyError/TypeError on a damaged record."""
        doc = json.loads(raw)
        return cls(str(doc["id"]), base64.b64decode(doc["payload"]), float(doc["saved_at"]))


def oldest_first(found: list[PendingCallback]) -> list[tuple[str, bytes]]:
    """Pending callbacks as ``CallbackOutbox.list_pending`` returns them."""
    return [(p.callback_id, p.payload) for p in sorted(found, key=lambda p: p.saved_at)]
