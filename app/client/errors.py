"""Exceptions of the upload client. Every one carries a message fit to show a user."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.client.state import SessionState


class UploadClientError(Exception):
    """Base class: the upload did not complete."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RetriesExhausted(UploadClientError):
    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class UploadRefused(UploadClientError):
    """A 4xx the client cannot fix by retrying (auth, bad name, too large...)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"server refused the upload ({status}): {message}")
        self.status = status
        self.body = body


class OffsetError(UploadClientError):
    """The server reports a stored offset that cannot be true: more bytes than
    this client sent, or fewer than it already acknowledged. Continuing would
    write an object whose bytes are not the source's."""


class SessionGone(UploadClientError):
    """404/410 for a session this client started: cancelled or expired."""


class ChecksumMismatch(UploadClientError):
    """The completed object's crc32c differs from that of the bytes sent."""

    def __init__(self, message: str, expected: str, reported: str, result: Any = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.reported = reported
        self.result = result


class UploadPaused(UploadClientError):
    """Raised by ``upload()`` after ``pause()``: ``state`` resumes it later."""

    def __init__(self, state: SessionState) -> None:
        super().__init__(f"upload paused at byte {state.offset}")
        self.state = state
