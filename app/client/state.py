"""What a paused upload needs to continue in another process: small, JSON, no secrets
(request headers such as ``Authorization`` are not kept; pass them again)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATE_VERSION = 1


@dataclass(frozen=True)
class SessionState:
    url: str
    offset: int
    total: int | None
    chunk_size: int | None
    crc32c: int
    started: bool = True
    # The furthest byte ever handed to a connection: on resume the server may
    # report up to this much (a request whose answer was lost), never more.
    sent: int | None = None
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SessionState:
        if raw.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {raw.get('version')!r}")
        offset, crc = raw.get("offset"), raw.get("crc32c")
        if not isinstance(raw.get("url"), str) or not isinstance(offset, int) or offset < 0:
            raise ValueError("state needs a url and a non-negative offset")
        if not isinstance(crc, int) or not 0 <= crc < 2**32:
            raise ValueError("state needs a 32-bit crc32c value")
        total, chunk = raw.get("total"), raw.get("chunk_size")
        if total is not None and (not isinstance(total, int) or total < offset):
            raise ValueError("state total must be an integer >= offset")
        if chunk is not None and not isinstance(chunk, int):
            raise ValueError("state chunk_size must be an integer")
        sent = raw.get("sent")
        if sent is not None and (not isinstance(sent, int) or sent < offset):
            raise ValueError("state sent must be an integer >= offset")
        return cls(url=raw["url"], offset=offset, total=total, chunk_size=chunk, crc32c=crc,
                   started=bool(raw.get("started", True)), sent=sent)

    @classmethod
    def from_json(cls, text: str) -> SessionState:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically, so a second Ctrl-C mid-write leaves the old file or the new one."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.to_json() + "\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SessionState:
        return cls.from_json(Path(path).read_text())
