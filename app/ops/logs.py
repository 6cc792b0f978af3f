"""Logging set-up: readable text by default, one JSON object per line on request."""

from __future__ import annotations

import json
import logging
import sys
import time

from app.config import LoggingConfig

#: ``extra=`` fields the access log and others attach to records.
_EXTRA_FIELDS = (
    "request_id", "method", "upload_name", "action", "status", "bytes", "received",
    "offset_before", "offset", "duration_ms", "remote", "dialect",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def escape_controls(text: str) -> str:
    """``text`` with control characters shown as escapes, so a value that came
    from a client (a path with ``%0D%0A``) cannot start a forged log line."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Only the record's own line is escaped; a traceback appended after it
        # keeps its line breaks.
        return escape_controls(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{n}={escape_controls(str(getattr(record, n)))}" for n in _EXTRA_FIELDS
                  if getattr(record, n, None) is not None and n not in ("method",)]
        if not extras:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head} {' '.join(extras)}{newline}{rest}"


def setup_logging(config: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)
