"""Real server processes for tests that need more than one: ``AppProcess`` is
one ``python -m app`` configured from the environment (``s3_env``), and
``Cluster`` is N of them on one bucket, each behind its own ``S3Gate``
listener so the gate's log tells their S3 requests apart.

A process can be killed (SIGKILL, no chance to persist anything), frozen
(SIGSTOP) and thawed (SIGCONT), and started again on the same port; its output
goes to a log file that failing tests print.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from tests.conftest import free_port
from tests.s3_gate import S3Gate, Seen

ROOT = Path(__file__).resolve().parents[1]


class AppProcess:
    """``python -m app`` with ``env`` (``APP__*`` keys) on a port of its own,
    which a restart keeps."""

    def __init__(self, env: Mapping[str, str], log_path: str | Path, *, tag: str = "app",
                 port: int | None = None) -> None:
        self.tag = tag
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.proc: asyncio.subprocess.Process | None = None
        #: Processes started so far (a restart counts).
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, http: aiohttp.ClientSession, *, ready: str = "/readyz",
                    timeout: float = 60) -> None:
        """Start the process (again, on the same port) and wait until ``ready`` answers 200."""
        assert not self.running, f"{self.tag} is already running"
        # Only this process's own configuration: a developer's APP__ overrides
        # or PORT must not leak into it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("APP__")}
        env.pop("PORT", None)
        env.update({"PYTHONPATH": str(ROOT), **self.env})
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- {self.tag}: start {self.starts} ---\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port),
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.returncode is None, f"{self.tag} exited:\n{self.log()}"
            try:
                async with http.get(f"{self.url}{ready}") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            # Polling for start-up, not making a race: the process needs time to start.
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.tag} did not become ready in {timeout:g}s:\n{self.log()}")

    async def kill(self) -> None:
        """``kill -9``: the process gets no chance to persist or release anything."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            await self.proc.wait()

    #: Tests that only need the process gone call it ``stop``.
    stop = kill

    def pause(self) -> None:
        """SIGSTOP: the process is frozen mid-whatever, its sockets stay open."""
        assert self.proc is not None and self.running
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        assert self.proc is not None and self.running
        os.kill(self.proc.pid, signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def s3_env(endpoint: str, bucket: str, callback_url: str | None = None, *,
           prefix: str = "uploads/", part_size: str | None = None, max_attempts: int = 2,
           **extra: str) -> dict[str, str]:
    """The environment of a server on the S3 store at ``endpoint``; ``extra``
    adds ``APP__...`` keys as they are (e.g. ``APP__STORAGE__TAKEOVER_TIMEOUT="10s"``)."""
    env = {
        "APP__STORAGE__BACKEND": "s3",
        "APP__STORAGE__S3__BUCKET": bucket,
        "APP__STORAGE__S3__ENDPOINT_URL": endpoint,
        "APP__STORAGE__S3__PREFIX": prefix,
        "APP__STORAGE__S3__ADDRESSING_STYLE": "path",
        "APP__STORAGE__S3__MAX_ATTEMPTS": str(max_attempts),
        "APP__SERVER__DEMO_PAGE": "false",
    }
    if part_size is not None:
        env["APP__STORAGE__PART_SIZE"] = part_size
    if callback_url is not None:
        env.update({
            "APP__CALLBACKS__ON_COMPLETE_URL": callback_url,
            "APP__CALLBACKS__SECRET": "s3cret",
            "APP__CALLBACKS__BACKOFF": "0.01",
        })
    env.update(extra)
    return env


class Cluster:
    """``n`` server processes on one bucket; instance ``i`` reaches S3 through
    its own gate listener tagged ``tags[i]`` ("s0", "s1", ...)."""

    def __init__(self, gate: S3Gate, bucket: str, log_dir: Path, n: int = 3,
                 **env: str) -> None:
        self.gate = gate
        self.bucket = bucket
        self._log_dir = log_dir
        self._n = n
        self._env = env
        self.instances: list[AppProcess] = []

    @property
    def tags(self) -> list[str]:
        return [p.tag for p in self.instances]

    def __getitem__(self, index: int) -> AppProcess:
        return self.instances[index]

    def __len__(self) -> int:
        return len(self.instances)

    async def start(self, http: aiohttp.ClientSession) -> None:
        for i in range(self._n):
            tag = f"s{i}"
            endpoint = await self.gate.listener(tag)
            env = s3_env(endpoint, self.bucket, **self._env)
            self.instances.append(AppProcess(env, self._log_dir / f"{tag}.log", tag=tag))
        await asyncio.gather(*(p.start(http) for p in self.instances))

    async def restart(self, index: int, http: aiohttp.ClientSession) -> None:
        """Start instance ``index`` again on its port and listener (after a kill)."""
        process = self.instances[index]
        await process.kill()
        await process.start(http)

    async def close(self) -> None:
        for process in self.instances:
            await process.kill()

    def seen(self, tag: str | None = None, since: float = 0.0) -> list[Seen]:
        """What the gate saw (from ``tag``), of requests that arrived after ``since``."""
        return [s for s in self.gate.seen(tag) if s.at > since]

    def logs(self) -> str:
        """Every instance's log, each under its tag: what a failing test prints."""
        return "\n".join(f"===== {p.tag} ({p.log_path}) =====\n{p.log()}"
                         for p in self.instances)
