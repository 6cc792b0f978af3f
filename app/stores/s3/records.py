"""S3 store session records: the record model (``_Record``), its staged
segments (``_Segment``) and the bounded cache of staged bytes (``_StagedCache``)."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

from app.stores.base import CompletedObject, UploadInfo

log = logging.getLogger("app.stores.s3")

_RECORD_FORMAT = 1
#: Object metadata key tying a finished object to the session that wrote it, so a
#: retried finish can tell "already completed by me" from "gone".
_SESSION_META = "upload-session"


# -- the session record ------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    """One staged object: bytes ``[start, start + length)`` of the upload."""

    start: int
    length: int
    crc32c: int
    #: Unique per write, so two writers at one offset never share a key.
    token: str

    @property
    def leaf(self) -> str:
        return f"{self.start:020d}-{self.token}"


@dataclass(frozen=True)
class _Record:
    name: str
    session_id: str
    upload_id: str
    offset: int
    total: int | None
    part_size: int
    crc32c: int
    content_type: str
    metadata: dict[str, str]
    owner: str | None
    created_at: float
    updated_at: float
    #: "CRC32C" when the MPU was created with per-part checksums; kept in the
    #: record so a config change cannot mix modes within one MPU.
    checksum_algorithm: str | None
    #: Staged segments covering ``[offset // P * P, offset)`` in order.
    staged: tuple[_Segment, ...] = ()
    #: CRC32C of the staged bytes alone: the start of the next part's checksum.
    tail_crc32c: int = 0
    completed: CompletedObject | None = None
    target: str | None = None

    @property
    def object_name(self) -> str:
        return self.name if self.target is None else self.target

    def to_json(self) -> bytes:
        doc = {
            "format": _RECORD_FORMAT,
            **self.to_info(None).to_json(),
            "upload_id": self.upload_id,
            "checksum_algorithm": self.checksum_algorithm,
            "staged": [[s.start, s.length, s.crc32c, s.token] for s in self.staged],
            "tail_crc32c": self.tail_crc32c,
        }
        # ASCII escapes keep any metadata text encodable.
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> _Record:
        doc = json.loads(raw)
        info = UploadInfo.from_json(doc)
        return cls(
            **{name: getattr(info, name) for name in _SESSION_FIELDS},
            upload_id=str(doc["upload_id"]),
            checksum_algorithm=doc.get("checksum_algorithm"),
            staged=tuple(
                _Segment(int(a), int(b), int(c), str(t)) for a, b, c, t in doc.get("staged", [])
            ),
            tail_crc32c=int(doc.get("tail_crc32c", 0)),
        )

    def to_info(self, version: str | None) -> UploadInfo:
        return UploadInfo(
            **{name: getattr(self, name) for name in _SESSION_FIELDS},
            version=version,
        )


#: The fields a record shares with ``UploadInfo``.
_SESSION_FIELDS = (
    "name", "session_id", "offset", "total", "part_size", "crc32c", "content_type",
    "metadata", "owner", "created_at", "updated_at", "completed", "target",
)


# -- the staged-bytes cache --------------------------------------------------


class _StagedCache:
    """Staged segments this process wrote, so filling a part rarely GETs them
    back. Bounded, least recently used session evicted first; a miss just reads
    the bucket, which stays the source of truth."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._size = 0
        self._sessions: OrderedDict[str, dict[str, bytes]] = OrderedDict()

    def put(self, session_id: str, leaf: str, data: bytes) -> None:
        if len(data) > self._budget:
            return
        segments = self._sessions.setdefault(session_id, {})
        old = segments.pop(leaf, None)
        if old is not None:
            self._size -= len(old)
        segments[leaf] = data
        self._size += len(data)
        self._sessions.move_to_end(session_id)
        while self._size > self._budget and self._sessions:
            _, evicted = self._sessions.popitem(last=False)
            self._size -= sum(len(d) for d in evicted.values())

    def get(self, session_id: str, leaf: str) -> bytes | None:
        segments = self._sessions.get(session_id)
        if segments is None:
            return None
        self._sessions.move_to_end(session_id)
        return segments.get(leaf)

    def drop(self, session_id: str, leaves: Collection[str] | None = None) -> None:
        segments = self._sessions.get(session_id)
        if segments is None:
            return
        for leaf in list(segments) if leaves is None else leaves:
            data = segments.pop(leaf, None)
            if data is not None:
                self._size -= len(data)
        if not segments:
            del self._sessions[session_id]

    @property
    def size(self) -> int:
        return self._size


def _parse_listed(key: str, raw: bytes) -> _Record | None:
    """A listed session record; None (logged) when it is damaged."""
    try:
        return _Record.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("skipping damaged session record %s: %r", key, exc)
        return None
