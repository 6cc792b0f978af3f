"""Real clients against the proxy: google-resumable-media and curl."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from google import resumable_media
from google.resumable_media.requests import ResumableUpload

from app.errors import UploadNotFound
from app.http import keys
from tests.http_support import Proxy
from tests.relay import TcpRelay
from tests.test_http import crc_b64, proxies, stored_object  # noqa: F401

MIB = 1024 * 1024


class CuttingTransport(requests.Session):
    """A requests session whose ``cut_on``-th chunk PUT is sent over a raw socket
    with only half its body, and then the connection is dropped."""

    def __init__(self, cut_on: int) -> None:
        super().__init__()
        self.cut_on = cut_on
        self.chunk_puts = 0
        #: Where the cut chunk started (the offset acknowledged before it).
        self.cut_start = -1

    def request(self, method, url, data=None, headers=None, **kwargs):  # type: ignore[override]
        if method == "PUT" and data:
            self.chunk_puts += 1
            if self.chunk_puts == self.cut_on:
                ranges = [v for k, v in (headers or {}).items() if k.lower() == "content-range"]
                self.cut_start = int(ranges[0].split()[1].split("-")[0])
                self._send_half(url, data, headers or {})
                raise requests.ConnectionError("connection cut mid-body by the test")
        return super().request(method, url, data=data, headers=headers, **kwargs)

    @staticmethod
    def _send_half(url: str, data: bytes, headers: dict[str, str]) -> None:
        match = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
        assert match
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        lines = [f"PUT {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(data)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        with socket.create_connection((host, port)) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data[: len(data) // 2])


def gcs_upload(url: str, data: bytes, chunk_size: int, cut_on: int,
               settle: Callable[[int], None]) -> tuple[dict, int]:
    """Upload ``data``; after the cut, ``settle(offset acknowledged before it)``
    returns once the proxy has persisted what arrived and let the upload go."""
    transport = CuttingTransport(cut_on)
    upload = ResumableUpload(url, chunk_size, checksum="crc32c")
    upload._retry_strategy = resumable_media.RetryStrategy(max_retries=0)
    stream = io.BytesIO(data)
    upload.initiate(transport, stream, {"name": "ignored-by-proxy", "metadata": {"k": "v"}},
                    "application/x-test", total_bytes=len(data))
    recovered = 0
    while not upload.finished:
        try:
            response = upload.transmit_next_chunk(transport)
        except requests.ConnectionError:
            settle(transport.cut_start)  # the proxy persists what arrived before the probe
            upload.recover(transport)
            recovered += 1
            continue
        if upload.finished:
            return response.json(), recovered
    raise AssertionError("unreachable")


async def test_google_resumable_media_with_recover(proxies, store_harness) -> None:  # noqa: F811
    proxy = await proxies.start()
    data = os.urandom(9 * MIB + 4321)
    loop = asyncio.get_running_loop()

    def settle(before: int) -> None:
        asyncio.run_coroutine_threadsafe(
            persisted_and_released(proxy, "gcs/file.bin", past=before), loop
        ).result()

    doc, recovered = await asyncio.to_thread(
        gcs_upload, f"{proxy.url}/upload/gcs/file.bin", data, 2 * MIB, 3, settle
    )
    assert recovered == 1
    assert doc["crc32c"] == crc_b64(data)
    assert doc["size"] == len(data)
    assert doc["contentType"] == "application/x-test"
    assert doc["metadata"] == {"k": "v"}
    assert await stored_object(store_harness, "gcs/file.bin") == data


async def persisted_and_released(proxy: Proxy, name: str, past: int,
                                 timeout: float = 30) -> None:
    """Until the proxy has stored more than ``past`` bytes of ``name`` and no
    request of it holds the upload (the cut one has persisted and ended)."""
    store, writers = proxy.app[keys.STORE], proxy.app[keys.WRITERS]

    async def offset() -> int:
        try:
            return (await store.get(name)).offset
        except UploadNotFound:
            return 0

    async with asyncio.timeout(timeout):
        while writers.is_held(name) or await offset() <= past:
            await asyncio.sleep(0.02)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_walk_cut_probe_resume(proxies, store_harness, tmp_path: Path) -> None:  # noqa: F811
    """The README's walk: start a curl upload, kill it, probe, resume with -C."""
    proxy = await proxies.start()
    source = tmp_path / "movie.bin"
    data = os.urandom(12 * MIB)
    source.write_bytes(data)
    url = f"{proxy.url}/upload/walk/movie.bin"
    # The first upload goes through a relay that passes 1 MiB and holds the rest,
    # so curl is killed part-way through whatever the machine's speed.
    with TcpRelay("127.0.0.1", proxy.port, hold_after=MIB) as relay:
        slow = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--limit-rate", "2M", "-T", str(source),
            f"{relay.url}/upload/walk/movie.bin",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        assert await asyncio.to_thread(relay.held.wait, 60)
        slow.kill()  # like Ctrl-C
        await slow.wait()
    await persisted_and_released(proxy, "walk/movie.bin", past=0)
    probe = await asyncio.to_thread(
        curl, "-i", "-X", "PUT", "-H", "Content-Range: bytes */*", url
    )
    assert probe.stdout.startswith("HTTP/1.1 308"), probe.stdout
    match = re.search(r"(?im)^Range: bytes=0-(\d+)\r?$", probe.stdout)
    assert match, probe.stdout
    offset = int(match.group(1)) + 1
    assert 0 < offset < len(data)
    done = await asyncio.to_thread(curl, "-C", str(offset), "-T", str(source), url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["crc32c"] == crc_b64(data)
    assert await stored_object(store_harness, "walk/movie.bin") == data
