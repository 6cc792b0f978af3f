"""Graceful shutdown of the real server process (``python -m app``).

On SIGTERM the server stops accepting, asks running uploads to end their body
stream and persist what arrived, waits up to ``server.shutdown_timeout`` and
exits 0. What was persisted must survive a restart byte for byte.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from tests.http_support import unread_by_server, unsent_bytes

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
SHUTDOWN_TIMEOUT = 15.0


class Server:
    """One ``python -m app`` process over a filesystem store in ``root``."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APP__")}
        env.update({
            "PYTHONPATH": str(ROOT),
            "APP__STORAGE__FILESYSTEM__ROOT": str(self.root),
            "APP__SERVER__SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT:g}s",
        })
        env.pop("PORT", None)
        with open(self._log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not come up:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Signal the process; its exit code and how long it took to exit."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=SHUTDOWN_TIMEOUT + 15)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    proc = Server(tmp_path / "data", tmp_path / "server.log")
    yield proc
    proc.kill()


def wait_until_drained(sock: socket.socket, timeout: float = 120.0) -> None:
    """Until the server process has read all it was sent on ``sock`` (nothing
    left unacknowledged here or unread in its socket), so what the kernel still
    buffers does not blur the comparison."""
    deadline = time.monotonic() + timeout
    while unsent_bytes(sock) or unread_by_server(sock):
        assert time.monotonic() < deadline, "the server did not read what it was sent"
        time.sleep(0.05)


def read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks):
                break
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def probe_offset(url: str) -> int:
    resp = requests.put(url, headers={"Content-Range": "bytes */*"}, allow_redirects=False,
                        timeout=30)
    assert resp.status_code == 308, resp.text
    rng = resp.headers.get("Range")
    return 0 if rng is None else int(rng.rsplit("-", 1)[1]) + 1


def test_sigterm_mid_upload_keeps_what_arrived(server: Server) -> None:
    total, sent = 100 * MIB, 60 * MIB
    data = random.Random(7).randbytes(total)
    server.start()
    name = "videos/big.bin"

    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(
            f"PUT /upload/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {total}\r\nContent-Type: video/mp4\r\n\r\n".encode()
        )
        sock.sendall(data[:sent])
        # The client stalls here with the connection open, as a phone that
        # lost its network would.
        wait_until_drained(sock)
        code, took = server.stop(signal.SIGTERM)
        answer = read_response(sock, timeout=5)
    finally:
        sock.close()
    assert code == 0, server.log()
    assert took < SHUTDOWN_TIMEOUT, f"took {took:.1f}s\n{server.log()}"
    # The stopped request was answered before the connection closed.
    assert answer.startswith(b"HTTP/1.1 308"), answer[:200]

    server.start()
    url = f"{server.url}/upload/{name}"
    offset = probe_offset(url)
    print(f"\nsent {sent} bytes; persisted {offset}; shutdown took {took:.2f}s")
    assert f"Range: bytes=0-{offset - 1}".encode() in answer
    # Never more than was sent; all of it once the server had drained the socket.
    assert sent - 8 * MIB <= offset <= sent

    resp = requests.put(url, data=data[offset:], allow_redirects=False, timeout=120,
                        headers={"Content-Range": f"bytes {offset}-{total - 1}/{total}"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["size"] == total
    assert (server.root / name).read_bytes() == data
    code, _ = server.stop(signal.SIGTERM)
    assert code == 0, server.log()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_server_exits_0(server: Server, signum: int) -> None:
    server.start()
    # A keep-alive connection left open must not hold the exit up.
    session = requests.Session()
    assert session.get(f"{server.url}/readyz", timeout=5).status_code == 200
    code, took = server.stop(signum)
    session.close()
    assert code == 0, server.log()
    assert took < 5, f"took {took:.1f}s\n{server.log()}"
