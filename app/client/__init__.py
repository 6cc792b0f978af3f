"""A resilient client for the upload proxy (and GCS-style resumable session URLs).

Only aiohttp and google-crc32c are needed: nothing here imports the server.

    from app.client import upload
    result = await upload("http://127.0.0.1:8080/upload/videos/a.mp4", "a.mp4")
"""

from app.client.api import (
    ResumableWriter,
    Uploader,
    resume,
    resume_sync,
    upload,
    upload_events,
    upload_sync,
    writer,
)
from app.client.errors import (
    ChecksumMismatch,
    OffsetError,
    RetriesExhausted,
    SessionGone,
    UploadClientError,
    UploadPaused,
    UploadRefused,
)
from app.client.progress import Completed, Event, Progress, Resumed, Retrying
from app.client.retry import Backoff
from app.client.state import SessionState

__all__ = [
    "Backoff",
    "ChecksumMismatch",
    "Completed",
    "Event",
    "OffsetError",
    "Progress",
    "ResumableWriter",
    "Resumed",
    "RetriesExhausted",
    "Retrying",
    "SessionGone",
    "SessionState",
    "UploadClientError",
    "UploadPaused",
    "UploadRefused",
    "Uploader",
    "resume",
    "resume_sync",
    "upload",
    "upload_events",
    "upload_sync",
    "writer",
]
