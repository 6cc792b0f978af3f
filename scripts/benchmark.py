#!/usr/bin/env python3
"""Benchmark the upload proxy against references measured in the same run.

    python scripts/benchmark.py [--size 1GiB] [--s3-size 256MiB] [--chunk 8MiB]
                                [--store filesystem|s3|both] [--json]

Every figure is reported next to a reference taken on the same machine in the
same run, because absolute MB/s says more about the machine than the proxy:

* filesystem: the proxy (``python -m app``, filesystem store) against a
  minimal aiohttp server that streams the body to a file with the same
  ``readany()`` reads and fsyncs before answering;
* s3: the proxy (S3 store) against a direct boto3 multipart upload of the same
  bytes, both into a moto server. moto is the wall-clock bottleneck there, so
  the figure that speaks for the proxy is its own CPU-seconds per GiB.

Each upload is done once as a single plain PUT and once as ``--chunk``-sized
``Content-Range`` PUTs. Every measurement gets fresh server processes (and a
fresh moto), so one run's memory or garbage cannot leak into the next.

Figures: wall MB/s (10^6 bytes/s), the server process's CPU (utime + stime from
``/proc/<pid>/stat``) per GiB, and its peak RSS during the upload. Ratios are
proxy / reference: below 1 for MB/s and above 1 for CPU and RSS mean the proxy
costs more. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import google_crc32c

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
#: Generated data comes in blocks of this size; each is one write to the socket.
BLOCK = MIB
#: The part size of the direct boto3 reference: the proxy's default part_size.
DIRECT_PART_SIZE = 6 * MIB
CLK_TCK = os.sysconf("SC_CLK_TCK")
RSS_SAMPLE_INTERVAL = 0.05
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
BUCKET = "bench"

_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "kib": KIB, "mib": MIB, "gib": GIB, "tib": 1024 * GIB,
}

# The filesystem reference: what a minimal resumable-upload server costs. It
# reads the body exactly like the proxy (``readany()``), writes synchronously
# and fsyncs before every answer, because acknowledged bytes must be durable
# for resumption to mean anything; it computes no digest and keeps no state.
REFERENCE_SERVER = r"""
import os, re, sys
from aiohttp import web

host, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)")

async def put(request):
    path = os.path.join(root, request.match_info["name"])
    match = RANGE.fullmatch(request.headers.get("Content-Range", ""))
    start, total = (int(match[1]), int(match[3])) if match else (0, None)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if start else os.O_TRUNC), 0o644)
    received = 0
    try:
        os.lseek(fd, start, os.SEEK_SET)
        while True:
            data = await request.content.readany()
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            received += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    end = start + received
    if total is not None and end < total:
        return web.Response(status=308, headers={"Range": f"bytes=0-{end - 1}"})
    return web.json_response({"size": end})

app = web.Application()
app.router.add_put("/upload/{name}", put)
web.run_app(app, host=host, port=port, print=None, access_log=None)
"""

# The S3 reference: the same bytes sent straight to moto by boto3, configured
# like the proxy's client (no payload signing, CRC32C part checksums computed
# with google_crc32c) so the comparison is the proxy's overhead, not a
# different client setup. Parts go one at a time: the simplest direct client.
# It waits on stdin around the upload so the parent can take CPU and RSS
# readings of exactly the upload, without boto3's import and set-up.
DIRECT_S3_UPLOAD = r"""
import base64, json, random, sys, time
import boto3, google_crc32c
from botocore.config import Config

endpoint, bucket, key = sys.argv[1], sys.argv[2], sys.argv[3]
size, part_size, seed, block = (int(v) for v in sys.argv[4:8])
client = boto3.client(
    "s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id="testing", aws_secret_access_key="testing",
    config=Config(s3={"addressing_style": "path", "payload_signing_enabled": False},
                  request_checksum_calculation="when_supported",
                  response_checksum_validation="when_supported"),
)
client.create_bucket(Bucket=bucket)
base_tail = random.Random(seed).randbytes(block)[8:]

def piece(start, end):
    out = []
    pos = start
    while pos < end:
        index, skip = divmod(pos, block)
        data = index.to_bytes(8, "big") + base_tail
        take = min(block - skip, end - pos)
        out.append(data[skip:skip + take])
        pos += take
    return b"".join(out)

def b64(crc):
    return base64.b64encode(crc.to_bytes(4, "big")).decode()

print("READY", flush=True)
sys.stdin.readline()
started = time.perf_counter()
upload_id = client.create_multipart_upload(
    Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C")["UploadId"]
parts, crc = [], 0
for number, start in enumerate(range(0, size, part_size), 1):
    data = piece(start, min(start + part_size, size))
    part_crc = google_crc32c.value(data)
    crc = google_crc32c.extend(crc, data)
    etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                              Body=data, ChecksumCRC32C=b64(part_crc))["ETag"]
    parts.append({"PartNumber": number, "ETag": etag, "ChecksumCRC32C": b64(part_crc)})
client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                 MultipartUpload={"Parts": parts})
wall = time.perf_counter() - started
print(json.dumps({"wall_s": wall, "crc32c": crc, "parts": len(parts)}), flush=True)
sys.stdin.readline()
"""


# -- sizes -------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1GiB, 512MiB, 8MiB)")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return value


def human_size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def crc32c_b64(crc: int) -> str:
    """Base64 of the big-endian CRC32C, as the proxy reports it."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


# -- generated data ----------------------------------------------------------


class RunningCrc:
    """CRC32C of the bytes put on the wire, each offset counted once, so a
    chunk resent after a short acknowledgement does not skew it."""

    def __init__(self) -> None:
        self.value = 0
        self.offset = 0

    def feed(self, start: int, data: bytes) -> None:
        end = start + len(data)
        if start <= self.offset < end:
            self.value = google_crc32c.extend(self.value, data[self.offset - start:])
            self.offset = end


class Payload:
    """SIZE bytes from one random block, never all in memory at once.

    Each block starts with its own index, so a store that drops, repeats or
    reorders blocks changes the CRC instead of passing unnoticed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._tail = random.Random(seed).randbytes(BLOCK)[8:]

    def block(self, index: int) -> bytes:
        return index.to_bytes(8, "big") + self._tail

    def pieces(self, start: int, end: int) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        pos = start
        while pos < end:
            index, skip = divmod(pos, BLOCK)
            take = min(BLOCK - skip, end - pos)
            data = self.block(index)
            out.append((pos, data if take == BLOCK else data[skip:skip + take]))
            pos += take
        return out

    async def stream(self, start: int, end: int, crc: RunningCrc) -> AsyncIterator[bytes]:
        pos = start
        while pos < end:
            # One block at a time: a chunk can be as large as the whole upload.
            stop = min(end, (pos // BLOCK + 1) * BLOCK)
            for piece_start, data in self.pieces(pos, stop):
                crc.feed(piece_start, data)
                yield data
            pos = stop

    def expected_crc(self, size: int) -> int:
        crc = RunningCrc()
        for start in range(0, size, BLOCK):
            for piece_start, data in self.pieces(start, min(size, start + BLOCK)):
                crc.feed(piece_start, data)
        return crc.value


# -- process readings --------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        text = f.read()
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_bytes(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * KIB
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (Linux >= 4.0) so it covers the upload, not start-up."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass
class Usage:
    cpu_s: float
    sampled_peak_rss: int
    vmhwm: int | None
    vmhwm_reset: bool

    @property
    def peak_rss(self) -> int:
        # An un-reset VmHWM would include start-up, so then only samples count.
        if self.vmhwm_reset and self.vmhwm is not None:
            return max(self.vmhwm, self.sampled_peak_rss)
        return self.sampled_peak_rss


class ProcessWatch:
    """CPU seconds and peak RSS of one process over one measured interval.

    RSS is sampled from a thread so a busy client event loop cannot delay it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=f"rss-{pid}", daemon=True)
        self._peak = 0
        self._cpu0 = 0.0
        self._reset = False

    def start(self) -> None:
        self._reset = reset_peak_rss(self.pid)
        self._cpu0 = proc_cpu_seconds(self.pid)
        self._peak = proc_status_bytes(self.pid, "VmRSS") or 0
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL):
            rss = proc_status_bytes(self.pid, "VmRSS")
            if rss is None:
                return
            self._peak = max(self._peak, rss)

    def stop(self) -> Usage:
        self._stop.set()
        self._thread.join(timeout=2.0)
        rss = proc_status_bytes(self.pid, "VmRSS") or 0
        return Usage(
            cpu_s=proc_cpu_seconds(self.pid) - self._cpu0,
            sampled_peak_rss=max(self._peak, rss),
            vmhwm=proc_status_bytes(self.pid, "VmHWM"),
            vmhwm_reset=self._reset,
        )


# -- child processes ---------------------------------------------------------


def _die_with_parent() -> None:
    # Children run in their own session (so Ctrl-C reaches only this script,
    # which then stops them in order); this makes sure they still go if the
    # benchmark itself is killed outright.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment minus anything that could steer a child away from the
    settings measured here: the proxy's own overrides, AWS profiles and
    endpoints, HTTP proxies (everything here is on 127.0.0.1)."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("APP__", "AWS_"))
        and k.upper() not in ("PORT", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    }
    env.update(NO_PROXY=f"{HOST},localhost", no_proxy=f"{HOST},localhost",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 8) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 8 * KIB))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return "\n".join(f"    | {line}" for line in tail)


class ChildFailed(Exception):
    """A server or reference process did not do its part; carries its log tail."""

    def __init__(self, child: Child, message: str) -> None:
        tail = child.log_tail()
        super().__init__(f"{child.name}: {message}" + (f"\n{tail}" if tail else ""))


def _open_log(path: Path) -> BinaryIO:
    return open(path, "ab")


async def spawn(
    name: str, argv: list[str], env: dict[str, str], log_path: Path, *, pipes: bool = False
) -> Child:
    # The child gets its own descriptor; ours is closed as soon as it has started.
    log = _open_log(log_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipes else log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        log.close()
    return Child(name, proc, log_path)


async def stop_child(child: Child) -> None:
    """SIGTERM (the proxy persists and exits cleanly), then SIGKILL if it lingers."""
    if child.proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.proc.terminate()
    try:
        await asyncio.wait_for(child.proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await asyncio.wait_for(child.proc.wait(), STOP_TIMEOUT)


async def wait_http(child: Child) -> None:
    """Wait until the child serves HTTP. ``/healthz`` is asked first, but any
    HTTP answer will do: it proves the listener is up, and a server without
    that route (the reference, moto, an older proxy) still answers."""
    deadline = time.monotonic() + START_TIMEOUT
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            if child.proc.returncode is not None:
                raise ChildFailed(child, f"exited with status {child.proc.returncode} "
                                         "before accepting connections")
            try:
                async with session.get(f"{child.url}/healthz") as resp:
                    await resp.read()
                return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ChildFailed(child, f"not answering HTTP after {START_TIMEOUT:g}s")
            await asyncio.sleep(0.1)


def upload_time_limit(size: int) -> float:
    # Generous: a stalled upload must end the run, a slow machine must not.
    return 120.0 + size / (10 * 1000**2)


# -- uploads -----------------------------------------------------------------


@dataclass
class UploadOutcome:
    final: dict[str, Any]
    requests: int
    crc: RunningCrc


def client_session() -> aiohttp.ClientSession:
    # One connection, reused by every chunk, as a real resumable client would.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=180),
    )


async def _final_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await resp.text()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {text[:300]}")
    try:
        doc = json.loads(text)
    except ValueError:
        raise RuntimeError(f"HTTP 200 without a JSON body: {text[:300]!r}") from None
    if not isinstance(doc, dict):
        raise RuntimeError(f"HTTP 200 with an unexpected body: {text[:300]!r}")
    return doc


async def put_plain(
    session: aiohttp.ClientSession, url: str, payload: Payload, size: int
) -> UploadOutcome:
    crc = RunningCrc()
    # An explicit Content-Length keeps aiohttp from sending it chunked.
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    async with session.put(url, data=payload.stream(0, size, crc), headers=headers,
                           allow_redirects=False) as resp:
        return UploadOutcome(await _final_json(resp), 1, crc)


async def put_chunked(
    session: aiohttp.ClientSession, url: str, payload: Payload, size: int, chunk: int
) -> UploadOutcome:
    crc = RunningCrc()
    offset, requests, stalls = 0, 0, 0
    while True:
        end = min(offset + chunk, size)
        headers = {
            "Content-Range": f"bytes {offset}-{end - 1}/{size}",
            "Content-Length": str(end - offset),
            "Content-Type": "application/octet-stream",
        }
        requests += 1
        async with session.put(url, data=payload.stream(offset, end, crc), headers=headers,
                               allow_redirects=False) as resp:
            if resp.status != 308:
                return UploadOutcome(await _final_json(resp), requests, crc)
            await resp.read()
            acked = resp.headers.get("Range")
            match = re.fullmatch(r"bytes=0-([0-9]+)", acked or "")
            stored = int(match.group(1)) + 1 if match else 0
        if end == size:
            raise RuntimeError(f"308 after the last chunk (Range: {acked})")
        # A short acknowledgement is legal: resend from where the server is.
        stalls = stalls + 1 if stored <= offset else 0
        if stalls >= 3:
            raise RuntimeError(f"no progress past byte {offset} after 3 chunks")
        offset = stored


# -- one measured run --------------------------------------------------------


@dataclass
class RunResult:
    label: str
    size: int
    wall_s: float = 0.0
    usage: Usage | None = None
    requests: int = 0
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    moto_cpu_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(self.checks.values())

    @property
    def mb_s(self) -> float | None:
        return self.size / self.wall_s / 1e6 if self.wall_s > 0 else None

    @property
    def cpu_per_gib(self) -> float | None:
        return self.usage.cpu_s / (self.size / GIB) if self.usage else None

    @property
    def moto_cpu_per_gib(self) -> float | None:
        return self.moto_cpu_s / (self.size / GIB) if self.moto_cpu_s is not None else None

    def to_json(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "label": self.label,
            "ok": self.ok,
            "error": self.error,
            "bytes": self.size,
            "requests": self.requests,
            "wall_s": round(self.wall_s, 4),
            "mb_per_s": _round(self.mb_s, 2),
            "cpu_s": round(usage.cpu_s, 3) if usage else None,
            "cpu_s_per_gib": _round(self.cpu_per_gib, 4),
            "peak_rss_bytes": usage.peak_rss if usage else None,
            "sampled_peak_rss_bytes": usage.sampled_peak_rss if usage else None,
            "vmhwm_bytes": usage.vmhwm if usage else None,
            "vmhwm_reset": usage.vmhwm_reset if usage else None,
            "moto_cpu_s_per_gib": _round(self.moto_cpu_per_gib, 4),
            "checks": self.checks,
            "notes": self.notes,
        }

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.label}: FAILED: {self.error}"
        usage = self.usage
        assert usage is not None
        failed = [name for name, passed in self.checks.items() if not passed]
        return (f"{self.label}: {self.mb_s:.1f} MB/s, {self.cpu_per_gib:.3f} CPU-s/GiB, "
                f"peak RSS {usage.peak_rss / MIB:.1f} MiB, {self.requests} request(s), "
                + ("verified" if not failed else f"CHECKS FAILED: {', '.join(failed)}"))


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def measure_http_upload(
    result: RunResult, server: Child, name: str, payload: Payload, chunk: int | None,
    moto: Child | None = None,
) -> UploadOutcome:
    """Upload ``result.size`` bytes to ``server`` while watching its CPU and RSS."""
    url = f"{server.url}/upload/{name}"
    async with client_session() as session:
        # A small upload first, so one-off costs (imports on first use,
        # connection set-up, store warm-up) stay out of the figures.
        warm = await put_plain(session, f"{server.url}/upload/warmup-{name}", payload, 64 * KIB)
        if "size" not in warm.final:
            raise RuntimeError(f"warm-up upload answered {warm.final}")
        watch = ProcessWatch(server.pid)
        moto_watch = ProcessWatch(moto.pid) if moto else None
        watch.start()
        if moto_watch:
            moto_watch.start()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(upload_time_limit(result.size)):
                if chunk is None:
                    outcome = await put_plain(session, url, payload, result.size)
                else:
                    outcome = await put_chunked(session, url, payload, result.size, chunk)
            result.wall_s = time.perf_counter() - started
        finally:
            result.usage = watch.stop()
            if moto_watch:
                result.moto_cpu_s = moto_watch.stop().cpu_s
    if not result.usage.vmhwm_reset:
        result.notes.append("VmHWM could not be reset: peak RSS is from 50 ms samples only")
    result.requests = outcome.requests
    return outcome


def check_upload(result: RunResult, outcome: UploadOutcome, expected_crc: int) -> None:
    result.checks["all bytes sent"] = outcome.crc.offset == result.size
    result.checks["sent bytes are the generated data"] = outcome.crc.value == expected_crc
    result.checks["answer size"] = outcome.final.get("size") == result.size
    if "crc32c" in outcome.final:
        result.checks["answer crc32c"] = outcome.final["crc32c"] == crc32c_b64(expected_crc)


def file_crc(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while data := f.read(4 * MIB):
            crc = google_crc32c.extend(crc, data)
            size += len(data)
    return size, crc


# -- filesystem --------------------------------------------------------------


async def filesystem_run(
    role: str, mode: str, args: argparse.Namespace, tmp: Path, payload: Payload,
    expected_crc: int,
) -> RunResult:
    what = "plain PUT" if mode == "plain" else f"{human_size(args.chunk)} chunks"
    result = RunResult(label=f"filesystem {role} {what}", size=args.size)
    root = tmp / f"fs-{role}-{mode}"
    root.mkdir()
    port = free_port()
    if role == "proxy":
        argv = [sys.executable, "-m", "app", "--host", HOST, "--port", str(port)]
        env = child_env({
            "APP__STORAGE__BACKEND": "filesystem",
            "APP__STORAGE__FILESYSTEM__ROOT": str(root),
            "APP__LOGGING__LEVEL": "WARNING",
            "APP__SERVER__SHUTDOWN_TIMEOUT": "5s",
        })
    else:
        argv = [sys.executable, "-c", REFERENCE_SERVER, HOST, str(port), str(root)]
        env = child_env({})
    server = await spawn(f"filesystem {role}", argv, env, tmp / f"fs-{role}-{mode}.log")
    server.url = f"http://{HOST}:{port}"
    name = f"bench-{mode}.bin"
    try:
        await wait_http(server)
        outcome = await measure_http_upload(
            result, server, name, payload, None if mode == "plain" else args.chunk)
        check_upload(result, outcome, expected_crc)
        stored = root / name
        if stored.exists():
            disk_size, disk_crc = await asyncio.to_thread(file_crc, stored)
            result.checks["file size"] = disk_size == args.size
            result.checks["file crc32c"] = disk_crc == expected_crc
        else:
            result.checks["file exists"] = False
    except Exception as exc:
        result.error = describe(exc)
    finally:
        await stop_child(server)
        # Each run's file is as large as the upload: free the disk at once.
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)
    return result


async def filesystem_section(
    args: argparse.Namespace, tmp: Path, payload: Payload, report: Callable[[str], None]
) -> dict[str, RunResult]:
    expected_crc = payload.expected_crc(args.size)
    free = shutil.disk_usage(tmp).free
    runs: dict[str, RunResult] = {}
    for mode in ("plain", "chunked"):
        for role in ("reference", "proxy"):
            key = f"{role}_{mode}"
            if free < args.size + 256 * MIB:
                runs[key] = RunResult(label=f"filesystem {role} {mode}", size=args.size,
                                      error=f"only {human_size(free)} free in {tmp}")
            else:
                runs[key] = await filesystem_run(role, mode, args, tmp, payload, expected_crc)
            report(runs[key].summary())
    return runs


# -- S3 ----------------------------------------------------------------------


async def start_moto(tmp: Path, tag: str) -> Child:
    port = free_port()
    moto = await spawn(
        "moto", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        child_env({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}),
        tmp / f"moto-{tag}.log",
    )
    moto.url = f"http://{HOST}:{port}"
    await wait_http(moto)
    return moto


def s3_head_size(endpoint: str, key: str) -> int:
    import boto3  # only the S3 part needs it

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    return int(client.head_object(Bucket=BUCKET, Key=key)["ContentLength"])


async def s3_direct_run(
    args: argparse.Namespace, tmp: Path, payload: Payload, expected_crc: int
) -> RunResult:
    result = RunResult(label=f"s3 direct boto3 ({human_size(DIRECT_PART_SIZE)} parts)",
                       size=args.s3_size)
    moto: Child | None = None
    direct: Child | None = None
    key = "bench-direct.bin"
    try:
        moto = await start_moto(tmp, "direct")
        argv = [sys.executable, "-c", DIRECT_S3_UPLOAD, moto.url, BUCKET, key,
                str(args.s3_size), str(DIRECT_PART_SIZE), str(payload.seed), str(BLOCK)]
        direct = await spawn("direct boto3 upload", argv, child_env({}),
                             tmp / "s3-direct.log", pipes=True)
        assert direct.proc.stdin is not None and direct.proc.stdout is not None
        line = await asyncio.wait_for(direct.proc.stdout.readline(), START_TIMEOUT)
        if line.strip() != b"READY":
            raise ChildFailed(direct, f"did not get ready (said {line[:200]!r})")
        watch = ProcessWatch(direct.pid)
        moto_watch = ProcessWatch(moto.pid)
        watch.start()
        moto_watch.start()
        try:
            direct.proc.stdin.write(b"go\n")
            await direct.proc.stdin.drain()
            line = await asyncio.wait_for(direct.proc.stdout.readline(),
                                          upload_time_limit(args.s3_size))
        finally:
            result.usage = watch.stop()
            result.moto_cpu_s = moto_watch.stop().cpu_s
        try:
            done = json.loads(line)
        except ValueError:
            raise ChildFailed(direct, f"upload failed (said {line[:200]!r})") from None
        # The child times only the upload, not its start-up or our hand-shake.
        result.wall_s = float(done["wall_s"])
        result.notes.append("wall time measured inside the boto3 process")
        result.requests = int(done["parts"]) + 2
        result.checks["uploaded bytes are the generated data"] = done["crc32c"] == expected_crc
        size = await asyncio.to_thread(s3_head_size, moto.url, key)
        result.checks["object size"] = size == args.s3_size
    except Exception as exc:
        result.error = describe(exc)
    finally:
        if direct is not None:
            if direct.proc.stdin is not None:
                direct.proc.stdin.close()
            await stop_child(direct)
        if moto is not None:
            await stop_child(moto)
    return result


async def s3_proxy_run(
    mode: str, args: argparse.Namespace, tmp: Path, payload: Payload, expected_crc: int
) -> RunResult:
    what = "plain PUT" if mode == "plain" else f"{human_size(args.chunk)} chunks"
    result = RunResult(label=f"s3 proxy {what}", size=args.s3_size)
    moto: Child | None = None
    proxy: Child | None = None
    name = f"bench-{mode}.bin"
    try:
        # A fresh moto per run: it keeps every object in RAM and slows as it grows.
        moto = await start_moto(tmp, f"proxy-{mode}")
        port = free_port()
        proxy = await spawn(
            "s3 proxy",
            [sys.executable, "-m", "app", "--host", HOST, "--port", str(port)],
            child_env({
                "APP__STORAGE__BACKEND": "s3",
                "APP__STORAGE__S3__BUCKET": BUCKET,
                "APP__STORAGE__S3__ENDPOINT_URL": moto.url,
                "APP__STORAGE__S3__CREATE_BUCKET": "true",
                "APP__STORAGE__S3__ADDRESSING_STYLE": "path",
                "APP__LOGGING__LEVEL": "WARNING",
                "APP__SERVER__SHUTDOWN_TIMEOUT": "5s",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_EC2_METADATA_DISABLED": "true",
                # Nothing from a developer's ~/.aws may change the client.
                "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
            }),
            tmp / f"s3-proxy-{mode}.log",
        )
        proxy.url = f"http://{HOST}:{port}"
        await wait_http(proxy)
        outcome = await measure_http_upload(
            result, proxy, name, payload, None if mode == "plain" else args.chunk, moto)
        check_upload(result, outcome, expected_crc)
        size = await asyncio.to_thread(s3_head_size, moto.url, name)
        result.checks["object size"] = size == args.s3_size
    except Exception as exc:
        result.error = describe(exc)
    finally:
        if proxy is not None:
            await stop_child(proxy)
        if moto is not None:
            await stop_child(moto)
    return result


async def s3_section(
    args: argparse.Namespace, tmp: Path, payload: Payload, report: Callable[[str], None]
) -> dict[str, RunResult]:
    expected_crc = payload.expected_crc(args.s3_size)
    runs: dict[str, RunResult] = {}
    runs["direct"] = await s3_direct_run(args, tmp, payload, expected_crc)
    report(runs["direct"].summary())
    for mode in ("plain", "chunked"):
        runs[f"proxy_{mode}"] = await s3_proxy_run(mode, args, tmp, payload, expected_crc)
        report(runs[f"proxy_{mode}"].summary())
    return runs


# -- report ------------------------------------------------------------------


def ratios(proxy: RunResult, reference: RunResult) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    usable = proxy.error is None and reference.error is None
    pu, ru = proxy.usage, reference.usage
    return {
        "mb_per_s": ratio(proxy.mb_s, reference.mb_s) if usable else None,
        "cpu_s_per_gib": ratio(proxy.cpu_per_gib, reference.cpu_per_gib) if usable else None,
        "peak_rss": ratio(pu.peak_rss if pu else None, ru.peak_rss if ru else None)
        if usable else None,
    }


def comparisons(sections: dict[str, dict[str, RunResult]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    fs = sections.get("filesystem")
    if fs:
        for mode in ("plain", "chunked"):
            out[f"filesystem {mode}"] = {
                "proxy": f"proxy_{mode}", "reference": f"reference_{mode}",
                "ratios": ratios(fs[f"proxy_{mode}"], fs[f"reference_{mode}"]),
            }
    s3 = sections.get("s3")
    if s3:
        for mode in ("plain", "chunked"):
            out[f"s3 {mode}"] = {
                "proxy": f"proxy_{mode}", "reference": "direct",
                "ratios": ratios(s3[f"proxy_{mode}"], s3["direct"]),
            }
    return out


def _cell(value: float | None, fmt: str, width: int, suffix: str = "") -> str:
    text = "-" if value is None else format(value, fmt) + suffix
    return f"{text:>{width}}"


def print_table(
    args: argparse.Namespace, sections: dict[str, dict[str, RunResult]],
    compared: dict[str, dict[str, Any]],
) -> None:
    sizes = []
    if "filesystem" in sections:
        sizes.append(f"filesystem {human_size(args.size)}")
    if "s3" in sections:
        sizes.append(f"S3 {human_size(args.s3_size)}")
    print(f"Upload benchmark: {', '.join(sizes)}; chunks {human_size(args.chunk)}; "
          f"{os.cpu_count()} CPUs; Python {platform.python_version()}")
    print("MB/s = 10^6 bytes per wall second; CPU-s/GiB and peak RSS are the server "
          "process's (the boto3 process's for the direct S3 reference)")
    print()
    header = (f"{'run':<40} {'MB/s':>9} {'CPU-s/GiB':>10} {'peak RSS MiB':>13} "
              f"{'moto CPU-s/GiB':>15}  check")
    print(header)
    print("-" * len(header))
    failures: list[str] = []
    for section, runs in sections.items():
        for run in runs.values():
            usage = run.usage
            if run.error is not None:
                print(f"{run.label:<40} {'FAILED (see below)':>49}")
                failures.append(f"{run.label}: {run.error}")
                continue
            bad = [name for name, passed in run.checks.items() if not passed]
            print(f"{run.label:<40} {_cell(run.mb_s, '.1f', 9)} "
                  f"{_cell(run.cpu_per_gib, '.3f', 10)} "
                  f"{_cell(usage.peak_rss / MIB if usage else None, '.1f', 13)} "
                  f"{_cell(run.moto_cpu_per_gib, '.3f', 15)}  "
                  + ("ok" if not bad else "FAILED: " + ", ".join(bad)))
        for label, comp in compared.items():
            if not label.startswith(section):
                continue
            r = comp["ratios"]
            against = "direct" if section == "s3" else "reference"
            print(f"{f'{label}: proxy/{against}':<40} {_cell(r['mb_per_s'], '.2f', 9, 'x')} "
                  f"{_cell(r['cpu_s_per_gib'], '.2f', 10, 'x')} "
                  f"{_cell(r['peak_rss'], '.2f', 13, 'x')}")
        print()
    if failures:
        print("Failures:")
        for text in failures:
            print(f"  {text}")


# -- main --------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, dict[str, RunResult]]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child.
    loop.add_signal_handler(signal.SIGTERM, task.cancel)

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    payload = Payload(args.seed)
    sections: dict[str, dict[str, RunResult]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    try:
        if args.store in ("filesystem", "both"):
            report(f"== filesystem store, {human_size(args.size)}")
            sections["filesystem"] = await filesystem_section(args, tmp, payload, report)
        if args.store in ("s3", "both"):
            report(f"== S3 store (moto), {human_size(args.s3_size)}")
            sections["s3"] = await s3_section(args, tmp, payload, report)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)
        loop.remove_signal_handler(signal.SIGTERM)
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark the upload proxy against same-machine references.")
    parser.add_argument("--size", type=parse_size, default=GIB,
                        help="bytes uploaded to the filesystem store (default 1GiB)")
    parser.add_argument("--s3-size", type=parse_size, default=256 * MIB,
                        help="bytes uploaded through moto (default 256MiB; moto keeps "
                             "everything in RAM and completes slowly)")
    parser.add_argument("--chunk", type=parse_size, default=8 * MIB,
                        help="Content-Range chunk size (default 8MiB)")
    parser.add_argument("--store", choices=("filesystem", "s3", "both"), default="both")
    parser.add_argument("--seed", type=int, default=20240601,
                        help="seed of the random data block")
    parser.add_argument("--json", action="store_true",
                        help="print all figures as JSON instead of the table")
    args = parser.parse_args(argv)
    if not Path("/proc/self/stat").exists():
        parser.error("needs Linux /proc to read process CPU and memory")

    try:
        sections = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    compared = comparisons(sections)
    if args.json:
        doc = {
            "settings": {"size": args.size, "s3_size": args.s3_size, "chunk": args.chunk,
                         "direct_part_size": DIRECT_PART_SIZE, "seed": args.seed},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "stores": {name: {key: r.to_json() for key, r in runs.items()}
                       for name, runs in sections.items()},
            "ratios": compared,
        }
        print(json.dumps(doc, indent=2))
    else:
        print_table(args, sections, compared)
    ok = all(r.ok for runs in sections.values() for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
