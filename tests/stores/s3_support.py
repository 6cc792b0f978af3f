"""Helpers for the S3 promise tests: a real ``python -m app`` server process
on S3 (through an ``S3Gate`` listener), and opening stores behind the gate."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


class AppProcess:
    """``python -m app`` on S3, configured from the environment, on a free port."""

    def __init__(self, endpoint: str, bucket: str, log_path: Path, *, prefix: str = "uploads/",
                 part_size: str = "5MiB", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("APP__")}
        self._env.pop("PORT", None)
        self._env.update({
            "PYTHONPATH": str(ROOT),
            "APP__STORAGE__BACKEND": "s3",
            "APP__STORAGE__PART_SIZE": part_size,
            "APP__STORAGE__S3__BUCKET": bucket,
            "APP__STORAGE__S3__ENDPOINT_URL": endpoint,
            "APP__STORAGE__S3__PREFIX": prefix,
            "APP__STORAGE__S3__ADDRESSING_STYLE": "path",
            # One attempt: a refused request must reach the test as it is.
            "APP__STORAGE__S3__MAX_ATTEMPTS": "1",
            "APP__SERVER__DEMO_PAGE": "false",
            **(env or {}),
        })
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        with open(self._log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port),
                cwd=ROOT, env=self._env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.returncode is None, self.log()
            try:
                async with http.get(f"{self.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            # Polling for readiness, not making a race: the process needs time to start.
            await asyncio.sleep(0.1)
        raise AssertionError(f"the server did not become ready:\n{self.log()}")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""
