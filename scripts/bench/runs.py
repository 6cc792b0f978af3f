"""One measured run of each row: the client side, the readings, the checks.

Every run gets fresh server processes (and a fresh moto), so one run's memory
or garbage cannot leak into the next.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import google_crc32c

from . import servers
from .common import (
    BUCKET,
    GIB,
    KIB,
    MIB,
    START_TIMEOUT,
    Child,
    ChildFailed,
    Payload,
    ProcessWatch,
    RunningCrc,
    Usage,
    crc32c_b64,
    describe,
    file_crc,
    human_size,
    stop_child,
    upload_time_limit,
)

#: S3 operations that write (or change) something; the rest only read.
S3_WRITES = frozenset({
    "PutObject", "UploadPart", "UploadPartCopy", "CreateMultipartUpload",
    "CompleteMultipartUpload", "AbortMultipartUpload", "DeleteObject", "DeleteObjects",
    "CopyObject",
})
_S3_COUNT = re.compile(
    r'^upload_proxy_s3_request_duration_seconds_count\{operation="([^"]+)"\}\s+(\S+)$', re.M)
PROBES = 3


@dataclass
class RunResult:
    label: str
    size: int
    wall_s: float = 0.0
    usage: Usage | None = None
    requests: int = 0
    #: S3 calls by operation during the upload, the mid-way probes excluded.
    s3_ops: dict[str, int] | None = None
    #: S3 calls per probe (``Content-Range: bytes */*``) in the middle of the upload.
    probe_s3: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    #: S3 calls are counted per S3 part (a plain PUT), not per client request.
    per_part: bool = False

    @property
    def units(self) -> int:
        if self.per_part and self.s3_ops:
            return self.s3_ops.get("UploadPart", 0)
        return self.requests

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
    def peak_rss_mib(self) -> float | None:
        return self.usage.peak_rss / MIB if self.usage else None

    @property
    def s3_per_request(self) -> float | None:
        if self.s3_ops is None or not self.units:
            return None
        return sum(self.s3_ops.values()) / self.units

    @property
    def s3_writes_per_request(self) -> float | None:
        if self.s3_ops is None or not self.units:
            return None
        return sum(n for op, n in self.s3_ops.items() if op in S3_WRITES) / self.units

    def to_json(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "label": self.label, "ok": self.ok, "error": self.error, "bytes": self.size,
            "requests": self.requests, "wall_s": round(self.wall_s, 4),
            "mb_per_s": self.mb_s, "cpu_s": usage.cpu_s if usage else None,
            "cpu_s_per_gib": self.cpu_per_gib,
            "peak_rss_bytes": usage.peak_rss if usage else None,
            "s3_ops": self.s3_ops, "probe_s3_calls": self.probe_s3,
            "checks": self.checks, "notes": self.notes,
        }

    def summary(self) -> str:
        if self.error is not None:
            return f"  {self.label}: FAILED: {self.error}"
        failed = [name for name, passed in self.checks.items() if not passed]
        s3 = f", S3 {self.s3_ops}" if self.s3_ops else ""
        return (f"  {self.label}: {self.mb_s or 0:.1f} MB/s, {self.cpu_per_gib or 0:.3f} "
                f"CPU-s/GiB, peak RSS {self.peak_rss_mib or 0:.1f} MiB, "
                f"{self.requests} request(s){s3}, "
                + ("verified" if not failed else f"CHECKS FAILED: {', '.join(failed)}"))


# -- HTTP uploads --------------------------------------------------------------


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


async def final_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
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
        return UploadOutcome(await final_json(resp), 1, crc)


async def probe(session: aiohttp.ClientSession, url: str) -> int:
    headers = {"Content-Range": "bytes */*", "Content-Length": "0"}
    async with session.put(url, headers=headers, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def put_chunked(
    session: aiohttp.ClientSession, url: str, payload: Payload, size: int, chunk: int,
    midway: Callable[[], Awaitable[None]] | None = None,
) -> UploadOutcome:
    crc = RunningCrc()
    offset, requests, stalls = 0, 0, 0
    half = (size // chunk) // 2 * chunk
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
                return UploadOutcome(await final_json(resp), requests, crc)
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
        if midway is not None and offset < half <= stored:
            await midway()
        offset = stored


async def s3_counts(session: aiohttp.ClientSession, proxy: Child) -> dict[str, int]:
    async with session.get(f"{proxy.url}/metrics") as resp:
        text = await resp.text()
    return {op: int(float(n)) for op, n in _S3_COUNT.findall(text)}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    out = {op: n - before.get(op, 0) for op, n in after.items()}
    return {op: n for op, n in sorted(out.items()) if n}


async def measure_http_upload(
    result: RunResult, server: Child, name: str, payload: Payload, chunk: int | None,
    *, s3_metrics: bool = False,
    hooks: tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]] | None = None,
) -> UploadOutcome:
    """Upload ``result.size`` bytes to ``server`` while watching its CPU and RSS."""
    url = f"{server.url}/upload/{name}"
    probe_ops: dict[str, int] = {}
    async with client_session() as session, aiohttp.ClientSession() as side:
        # A small upload first, so one-off costs (imports on first use,
        # connection set-up, store warm-up) stay out of the figures.
        warm = await put_plain(session, f"{server.url}/upload/warmup-{name}", payload, 64 * KIB)
        if "size" not in warm.final:
            raise RuntimeError(f"warm-up upload answered {warm.final}")
        before = await s3_counts(side, server) if s3_metrics else {}

        async def midway() -> None:
            # Probes in the middle of the upload: the S3 calls one probe costs.
            first = await s3_counts(side, server)
            statuses = [await probe(session, url) for _ in range(PROBES)]
            probe_ops.update(_delta(await s3_counts(side, server), first))
            result.checks["mid-way probes answer 308"] = all(s == 308 for s in statuses)

        if hooks is not None:
            await hooks[0]()
        watch = ProcessWatch(server.pid)
        watch.start()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(upload_time_limit(result.size)):
                if chunk is None:
                    outcome = await put_plain(session, url, payload, result.size)
                else:
                    outcome = await put_chunked(session, url, payload, result.size, chunk,
                                                midway if s3_metrics else None)
            result.wall_s = time.perf_counter() - started
        finally:
            result.usage = watch.stop()
            if hooks is not None:
                await hooks[1]()
        if s3_metrics:
            ops = _delta(await s3_counts(side, server), before)
            for op, n in probe_ops.items():
                ops[op] = ops.get(op, 0) - n
            result.s3_ops = {op: n for op, n in ops.items() if n}
            if probe_ops:
                result.probe_s3 = sum(probe_ops.values()) / PROBES
    if not result.usage.vmhwm_reset:
        result.notes.append("VmHWM could not be reset: peak RSS is from 50 ms samples only")
    result.requests = outcome.requests
    return outcome


def check_upload(result: RunResult, outcome: UploadOutcome, expected_crc: int) -> None:
    result.checks["all bytes sent"] = outcome.crc.offset == result.size
    result.checks["sent bytes are the generated data"] = outcome.crc.value == expected_crc
    if "size" in outcome.final:
        result.checks["answer size"] = outcome.final.get("size") == result.size
    if "crc32c" in outcome.final:
        result.checks["answer crc32c"] = outcome.final["crc32c"] == crc32c_b64(expected_crc)


def s3_object_crc(endpoint: str, key: str) -> tuple[int, int]:
    body = servers.s3_client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"]  # type: ignore[attr-defined]
    crc, size = 0, 0
    while data := body.read(4 * MIB):
        crc = google_crc32c.extend(crc, data)
        size += len(data)
    return size, crc


def s3_find_key(endpoint: str, prefix: str, size: int) -> str | None:
    client = servers.s3_client(endpoint)
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    for item in listing.get("Contents", []):
        if int(item["Size"]) == size and not item["Key"].endswith(".info"):
            return str(item["Key"])
    return None


async def verify_s3(result: RunResult, moto: Child, key: str | None, expected_crc: int) -> None:
    if key is None:
        result.checks["object found"] = False
        return
    size, crc = await asyncio.to_thread(s3_object_crc, moto.url, key)
    result.checks["stored object size"] = size == result.size
    result.checks["stored object crc32c"] = crc == expected_crc


# -- the rows ------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    tmp: Path
    payload: Payload
    crcs: dict[int, int]
    payload_file: Path | None = None
    node_root: Path | None = None

    def crc(self, size: int) -> int:
        if size not in self.crcs:
            self.crcs[size] = self.payload.expected_crc(size)
        return self.crcs[size]


def what(chunk: int | None) -> str:
    return "plain PUT" if chunk is None else f"{human_size(chunk)} chunks"


async def floor_run(ctx: Ctx) -> RunResult:
    size = ctx.args.s3_size
    result = RunResult(label="floor: aiohttp discarding the body", size=size)
    server = None
    try:
        server = await servers.start_script("floor", servers.FLOOR_SERVER, [], ctx.tmp, "floor")
        outcome = await measure_http_upload(result, server, "floor.bin", ctx.payload, None)
        check_upload(result, outcome, ctx.crc(size))
    except Exception as exc:
        result.error = describe(exc)
    finally:
        if server is not None:
            await stop_child(server)
    return result


async def fs_reference_run(ctx: Ctx) -> RunResult:
    size = ctx.args.size
    result = RunResult(label="fs reference: aiohttp write+fsync", size=size)
    root = ctx.tmp / "fs-reference"
    root.mkdir(exist_ok=True)
    server = None
    try:
        server = await servers.start_script("fs reference", servers.REFERENCE_SERVER,
                                            [str(root)], ctx.tmp, "fs-reference")
        outcome = await measure_http_upload(result, server, "ref.bin", ctx.payload, None)
        check_upload(result, outcome, ctx.crc(size))
    except Exception as exc:
        result.error = describe(exc)
    finally:
        if server is not None:
            await stop_child(server)
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)
    return result


async def fs_proxy_run(ctx: Ctx, chunk: int | None) -> RunResult:
    size = ctx.args.size
    result = RunResult(label=f"fs proxy {what(chunk)}", size=size)
    root = ctx.tmp / "fs-proxy"
    root.mkdir(exist_ok=True)
    proxy = None
    name = "bench.bin"
    try:
        proxy = await servers.start_proxy("filesystem", ctx.tmp, "fs", root=root)
        outcome = await measure_http_upload(result, proxy, name, ctx.payload, chunk)
        check_upload(result, outcome, ctx.crc(size))
        stored = root / name
        if stored.exists():
            disk_size, disk_crc = await asyncio.to_thread(file_crc, stored)
            result.checks["stored file size"] = disk_size == size
            result.checks["stored file crc32c"] = disk_crc == ctx.crc(size)
        else:
            result.checks["stored file exists"] = False
    except Exception as exc:
        result.error = describe(exc)
    finally:
        if proxy is not None:
            await stop_child(proxy)
        # Each run's file is as large as the upload: free the disk at once.
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)
    return result


async def s3_proxy_run(
    ctx: Ctx, chunk: int | None, *, part_size: int | None = None, size: int | None = None,
    config: dict[str, str] | None = None,
    hooks: Callable[[Child], tuple[Callable[[], Awaitable[None]],
                                   Callable[[], Awaitable[None]]]] | None = None,
) -> RunResult:
    size = size or ctx.args.s3_size
    label = f"s3 proxy {what(chunk)}"
    extra = dict(config or {})
    if part_size is not None:
        extra["APP__STORAGE__PART_SIZE"] = str(part_size)
    if extra:
        # The config keys changed, shortened: APP__STORAGE__S3__CHECKSUM_MODE -> checksum_mode.
        label += " (" + ", ".join(
            f"{k.rsplit('__', 1)[-1].lower()} "
            f"{human_size(int(v)) if v.isdigit() and int(v) >= MIB else v}"
            for k, v in extra.items()) + ")"
    result = RunResult(label=label, size=size, per_part=chunk is None)
    moto = proxy = None
    name = "bench.bin"
    try:
        # A fresh moto per run: it keeps every object in RAM and slows as it grows.
        moto = await servers.start_moto(ctx.tmp, "proxy")
        proxy = await servers.start_proxy("s3", ctx.tmp, "s3", moto=moto, extra=extra)
        outcome = await measure_http_upload(result, proxy, name, ctx.payload, chunk,
                                            s3_metrics=True,
                                            hooks=hooks(proxy) if hooks else None)
        check_upload(result, outcome, ctx.crc(size))
        await verify_s3(result, moto, name, ctx.crc(size))
    except Exception as exc:
        result.error = describe(exc)
    finally:
        if proxy is not None:
            await stop_child(proxy)
        if moto is not None:
            await stop_child(moto)
    return result


async def _handshake_run(result: RunResult, child: Child, watched: Child,
                         on_line: Callable[[bytes], None]) -> None:
    """Drive a client that says READY, uploads on a line from us, prints one
    JSON line and exits on the next: ``watched`` is measured in between."""
    assert child.proc.stdin is not None and child.proc.stdout is not None
    line = await asyncio.wait_for(child.proc.stdout.readline(), START_TIMEOUT)
    if line.strip() != b"READY":
        raise ChildFailed(child, f"did not get ready (said {line[:200]!r})")
    watch = ProcessWatch(watched.pid)
    watch.start()
    try:
        child.proc.stdin.write(b"go\n")
        await child.proc.stdin.drain()
        line = await asyncio.wait_for(child.proc.stdout.readline(),
                                      upload_time_limit(result.size))
    finally:
        result.usage = watch.stop()
    on_line(line)
    child.proc.stdin.write(b"done\n")
    await child.proc.stdin.drain()


def _json_line(child: Child, line: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except ValueError:
        raise ChildFailed(child, f"upload failed (said {line[:200]!r})") from None
    if "error" in doc:
        raise ChildFailed(child, f"upload failed: {doc['error']}")
    return dict(doc)


async def direct_run(ctx: Ctx, part_size: int) -> RunResult:
    size = ctx.args.s3_size
    result = RunResult(label=f"direct boto3 multipart ({human_size(part_size)} parts)",
                       size=size, per_part=True)
    moto = direct = None
    key = "bench-direct.bin"
    try:
        moto = await servers.start_moto(ctx.tmp, "direct")
        argv = [sys.executable, "-c", servers.DIRECT_S3_UPLOAD, moto.url, BUCKET, key,
                str(size), str(part_size), str(ctx.payload.seed), str(MIB)]
        direct = await servers.spawn("direct boto3 upload", argv, servers.child_env({}),
                                     ctx.tmp / "direct.log", pipes=True)

        def done(line: bytes) -> None:
            doc = _json_line(direct, line)
            # The child times only the upload, not its start-up or our hand-shake.
            result.wall_s = float(doc["wall_s"])
            result.requests = int(doc["parts"])
            result.s3_ops = {"CreateMultipartUpload": 1, "UploadPart": int(doc["parts"]),
                             "CompleteMultipartUpload": 1}
            result.checks["uploaded bytes are the generated data"] = (
                doc["crc32c"] == ctx.crc(size))

        await _handshake_run(result, direct, direct, done)
        result.notes.append("CPU and RSS of the boto3 process; wall measured inside it")
        await verify_s3(result, moto, key, ctx.crc(size))
    except Exception as exc:
        result.error = describe(exc)
    finally:
        if direct is not None:
            await stop_child(direct)
        if moto is not None:
            await stop_child(moto)
    return result


async def tus_detect(url: str) -> str | None:
    """The proxy's Tus-Version if its tus endpoint answers OPTIONS, else None."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.options(f"{url}/files/") as resp:
                await resp.read()
                return resp.headers.get("Tus-Version")
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def tus_run(ctx: Ctx, target: str, chunk: int) -> RunResult:
    """tus-js-client (node) uploading the payload file to the proxy's /files/
    or to the peer (@tus/server + @tus/s3-store), both into a fresh moto."""
    size = ctx.args.s3_size
    label = (f"peer @tus/server+s3-store {what(chunk)}" if target == "peer"
             else f"s3 proxy tus {what(chunk)}")
    result = RunResult(label=label, size=size)
    assert ctx.node_root is not None and ctx.payload_file is not None
    moto = server = client = None
    try:
        moto = await servers.start_moto(ctx.tmp, f"tus-{target}")
        if target == "peer":
            await asyncio.to_thread(
                servers.s3_client(moto.url).create_bucket, Bucket=BUCKET)  # type: ignore[attr-defined]
            server = await servers.start_peer(ctx.node_root, moto, chunk, ctx.tmp)
        else:
            server = await servers.start_proxy("s3", ctx.tmp, "s3-tus", moto=moto)
            if await tus_detect(server.url) is None:
                raise RuntimeError("the proxy has no tus endpoint")
        client = await servers.spawn_tus_client(ctx.node_root, f"{server.url}/files/",
                                                ctx.payload_file, chunk, "bench.bin", ctx.tmp)
        before: dict[str, int] = {}
        if target == "proxy":
            async with aiohttp.ClientSession() as side:
                before = await s3_counts(side, server)

        def done(line: bytes) -> None:
            doc = _json_line(client, line)
            result.wall_s = float(doc["wall_s"])
            result.requests = int(doc.get("requests", 0))

        await _handshake_run(result, client, server, done)
        if target == "proxy":
            async with aiohttp.ClientSession() as side:
                result.s3_ops = _delta(await s3_counts(side, server), before)
        result.notes.append("wall measured inside tus-js-client; requests = POST + PATCHes")
        key = await asyncio.to_thread(s3_find_key, moto.url, "", size)
        await verify_s3(result, moto, key, ctx.crc(size))
    except Exception as exc:
        result.error = describe(exc)
    finally:
        for child in (client, server, moto):
            if child is not None:
                await stop_child(child)
    return result
