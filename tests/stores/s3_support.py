"""Helpers for the S3 promise tests: a real ``python -m app`` server process
on S3 (through an ``S3Gate`` listener), configured as those tests need it."""

from __future__ import annotations

from pathlib import Path

from tests import instances


class AppProcess(instances.AppProcess):
    """``python -m app`` on S3 at ``endpoint``, with one S3 attempt per request;
    ``env`` adds or overrides ``APP__*`` keys."""

    def __init__(self, endpoint: str, bucket: str, log_path: Path, *, prefix: str = "uploads/",
                 part_size: str = "5MiB", env: dict[str, str] | None = None) -> None:
        # One attempt: a refused request must reach the test as it is.
        super().__init__(instances.s3_env(endpoint, bucket, prefix=prefix, part_size=part_size,
                                          max_attempts=1, **(env or {})), log_path)
