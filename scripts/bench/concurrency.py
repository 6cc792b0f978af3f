"""Many slow uploads at once against one proxy with its default config.

N plain PUTs (default 1,000) from one asyncio client, each sending a few KiB/s
for ``--slow-seconds`` and then the rest at full speed, so all N are open at
the same time and then finish in a burst. Meanwhile a prober sends
``Content-Range: bytes */*`` to a few other uploads that sit half-done (a
probe to an upload that is still writing would take it over, by design). We
report the proxy's peak RSS and CPU, probe latency p50/p99, and check every
stored object's CRC32C against what was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import google_crc32c

from app.config import StorageConfig

from . import servers
from .common import (
    BUCKET,
    KIB,
    MIB,
    START_TIMEOUT,
    ChildFailed,
    ProcessWatch,
    child_env,
    describe,
    file_crc,
    human_size,
    parse_size,
    raise_fd_limit,
    spawn,
    stop_child,
)

SLOW_TICK = 0.5
PROBE_TARGETS = 20
PROBE_GAP = 0.02


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("concurrency")
    g.add_argument("--uploads", type=int, default=1000,
                   help="concurrent uploads (default 1000)")
    g.add_argument("--upload-size", type=parse_size, default=256 * KIB,
                   help="bytes per concurrent upload (default 256KiB)")
    g.add_argument("--slow-seconds", type=float, default=8.0,
                   help="how long each upload trickles before full speed (default 8)")
    g.add_argument("--slow-rate", type=parse_size, default=4 * KIB,
                   help="bytes per second while trickling (default 4KiB)")
    g.add_argument("--ramp-seconds", type=float, default=3.0,
                   help="uploads start spread over this long (default 3)")


def content(base: bytes, i: int) -> bytes:
    return i.to_bytes(8, "big") + base[8:]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def slow_put(session: aiohttp.ClientSession, url: str, data: bytes, delay: float,
                   slow_s: float, rate: int) -> dict[str, Any]:
    await asyncio.sleep(delay)

    async def body() -> Any:
        piece = max(1, int(rate * SLOW_TICK))
        pos, until = 0, time.monotonic() + slow_s
        while time.monotonic() < until and pos + piece < len(data):
            yield data[pos:pos + piece]
            pos += piece
            await asyncio.sleep(SLOW_TICK)
        while pos < len(data):
            yield data[pos:pos + 64 * KIB]
            pos += 64 * KIB

    headers = {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
    async with session.put(url, data=body(), headers=headers) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {text[:200]}")
        return {"status": resp.status}


async def chunk(session: aiohttp.ClientSession, url: str, data: bytes, start: int,
                end: int) -> int:
    headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}",
               "Content-Length": str(end - start)}
    async with session.put(url, data=data[start:end], headers=headers,
                           allow_redirects=False) as resp:
        await resp.read()
        return resp.status


# The prober runs in a process of its own, so the latency it reports is the
# proxy's, not the lag of the client loop that drives the 1,000 uploads.
PROBER = r"""
import asyncio, json, random, sys, time
import aiohttp

gap, limit, urls = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]

async def main():
    latencies, statuses = [], {}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    headers = {"Content-Range": "bytes */*", "Content-Length": "0"}
    rng = random.Random(1)
    deadline = time.monotonic() + limit
    print("READY", flush=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                async with s.put(rng.choice(urls), headers=headers,
                                 allow_redirects=False) as resp:
                    await resp.read()
                    key = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            latencies.append(time.perf_counter() - started)
            statuses[key] = statuses.get(key, 0) + 1
            try:
                await asyncio.wait_for(stop.wait(), gap)
            except TimeoutError:
                pass
    print(json.dumps({"latencies": latencies, "statuses": statuses}), flush=True)

asyncio.run(main())
"""


def s3_crc(endpoint: str, key: str) -> tuple[int, int]:
    body = servers.s3_client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"]  # type: ignore[attr-defined]
    data = body.read()
    return len(data), google_crc32c.value(data)


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    store = "s3" if args.store == "s3" else "filesystem"
    n, size = args.uploads, args.upload_size
    limit = raise_fd_limit()
    lines = [f"concurrency: {n} uploads of {human_size(size)} at once into the {store} store "
             f"(default config), each trickling {human_size(args.slow_rate)}/s for "
             f"{args.slow_seconds:g} s, then full speed; {PROBE_TARGETS} half-done uploads "
             f"probed with 'Content-Range: bytes */*'; fd limit {limit}"]
    if limit < 2 * n + 200:
        lines.append(f"  skipped: the fd limit {limit} is too low for {n} uploads")
        return {"lines": lines, "ok": False, "json": {}}
    base = random.Random(args.seed).randbytes(size)
    root = tmp / "concurrency"
    root.mkdir(exist_ok=True)
    moto = proxy = None
    doc: dict[str, Any] = {"uploads": n, "upload_size": size, "store": store}
    ok = True
    try:
        if store == "s3":
            moto = await servers.start_moto(tmp, "concurrency")
            proxy = await servers.start_proxy("s3", tmp, "concurrency", moto=moto)
        else:
            proxy = await servers.start_proxy("filesystem", tmp, "concurrency", root=root)
        timeout = aiohttp.ClientTimeout(total=args.slow_seconds + args.ramp_seconds + 300,
                                        sock_connect=60)
        conn = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as side:
            # The probe targets: half of each sent, then left alone.
            targets = [f"{proxy.url}/upload/probe-{j:03d}.bin" for j in range(PROBE_TARGETS)]
            half = size // 2
            for j, url in enumerate(targets):
                status = await chunk(side, url, content(base, n + j), 0, half)
                if status != 308:
                    raise RuntimeError(f"first half of a probe target answered {status}")
            watch = ProcessWatch(proxy.pid)
            watch.start()
            started = time.monotonic()
            prober = await spawn("prober", [sys.executable, "-c", PROBER, str(PROBE_GAP),
                                            str(args.slow_seconds + args.ramp_seconds + 600),
                                            *targets], child_env({}), tmp / "prober.log",
                                 pipes=True)
            assert prober.proc.stdout is not None and prober.proc.stdin is not None
            line = await asyncio.wait_for(prober.proc.stdout.readline(), START_TIMEOUT)
            if line.strip() != b"READY":
                raise ChildFailed(prober, f"did not get ready (said {line[:200]!r})")
            watch = ProcessWatch(proxy.pid)
            watch.start()
            started = time.monotonic()
            uploads = [
                asyncio.create_task(slow_put(
                    session, f"{proxy.url}/upload/c-{i:05d}.bin", content(base, i),
                    args.ramp_seconds * i / n, args.slow_seconds, args.slow_rate))
                for i in range(n)
            ]
            outcomes = await asyncio.gather(*uploads, return_exceptions=True)
            wall = time.monotonic() - started
            prober.proc.stdin.write(b"stop\n")
            await prober.proc.stdin.drain()
            line = await asyncio.wait_for(prober.proc.stdout.readline(), 60)
            usage = watch.stop()
            await stop_child(prober)
            probed = json.loads(line)
            latencies, statuses = probed["latencies"], probed["statuses"]
            if not latencies:
                raise RuntimeError("the prober sent no probe")
            for j, url in enumerate(targets):
                status = await chunk(side, url, content(base, n + j), half, size)
                if status != 200:
                    raise RuntimeError(f"second half of a probe target answered {status}")
        errors = [describe(o) for o in outcomes if isinstance(o, BaseException)]
        # Every object, the probe targets too, checked against what was sent.
        names = [(f"c-{i:05d}.bin", i) for i in range(n)]
        names += [(f"probe-{j:03d}.bin", n + j) for j in range(PROBE_TARGETS)]
        bad = 0
        for name, i in names:
            want = google_crc32c.value(content(base, i))
            try:
                if store == "s3":
                    assert moto is not None
                    got_size, got = await asyncio.to_thread(s3_crc, moto.url, name)
                else:
                    got_size, got = await asyncio.to_thread(file_crc, root / name)
            except Exception:
                bad += 1
                continue
            bad += got_size != size or got != want
        p50, p99 = pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000
        peak = usage.peak_rss / MIB
        budget = StorageConfig().memory_budget / MIB
        doc.update(wall_s=wall, cpu_s=usage.cpu_s, peak_rss_mib=peak, probes=len(latencies),
                   probe_statuses=statuses, probe_p50_ms=p50, probe_p99_ms=p99,
                   failed_uploads=len(errors), bad_objects=bad, errors=errors[:5])
        lines += [
            f"  {n - len(errors)}/{n} uploads answered 200 in {wall:.1f} s; proxy CPU "
            f"{usage.cpu_s:.1f} s, peak RSS {peak:.0f} MiB",
            f"  probes: {len(latencies)} (statuses {statuses}), latency p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms, max {max(latencies) * 1000:.1f} ms",
            f"  objects byte-identical (crc32c and size): {len(names) - bad}/{len(names)}",
            f"  memory_budget: {budget:.0f} MiB (the default), so the target is peak RSS "
            f"<= {100 + budget:.0f} MiB (filesystem: no part buffers, the budget goes unused)"
            if store != "s3" else
            f"  memory_budget: {budget:.0f} MiB (the default), so the target is peak RSS "
            f"<= {100 + budget:.0f} MiB",
            f"  targets: peak RSS {peak:.0f} MiB <= {100 + budget:.0f} MiB: "
            + ("met" if peak <= 100 + budget else f"MISSED by {peak / (100 + budget) - 1:.0%}")
            + f"; probe p99 {p99:.1f} ms < 100 ms: "
            + ("met" if p99 < 100 else f"MISSED by {p99 / 100 - 1:.0%}")
            + "; every object identical: " + ("met" if not bad and not errors else "MISSED"),
        ]
        if errors:
            lines.append(f"  first errors: {errors[:3]}")
        ok = not bad and not errors
    except Exception as exc:
        lines.append(f"  FAILED: {describe(exc)}")
        if proxy is not None:
            lines.append(proxy.log_tail())
        ok = False
    finally:
        if proxy is not None:
            await stop_child(proxy)
        if moto is not None:
            await stop_child(moto)
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)
    return {"lines": lines, "ok": ok, "json": doc}
