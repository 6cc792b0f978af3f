"""The one entry command: ``python scripts/benchmark.py [all|table|concurrency|profile]``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import concurrency, profile, report, runs
from .common import MIB, Payload, human_size, parse_size, raise_fd_limit, write_payload_file
from .servers import node_dir

Job = Callable[[runs.Ctx], Awaitable[runs.RunResult]]


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def plan(ctx: runs.Ctx) -> tuple[list[tuple[str, Job]], list[str], str]:
    """The rows to run, notes to print, and the row the peer is compared with."""
    args = ctx.args
    notes: list[str] = []
    jobs: list[tuple[str, Job]] = []
    stores = ("filesystem", "s3") if args.store == "both" else (args.store,)
    c8, c1 = 8 * MIB, MIB
    if "s3" in stores:
        jobs += [
            ("floor", runs.floor_run),
            ("direct", lambda c: runs.direct_run(c, args.direct_part_size)),
            ("s3_plain", lambda c: runs.s3_proxy_run(c, None)),
            ("s3_c8", lambda c: runs.s3_proxy_run(c, c8)),
            ("s3_c1", lambda c: runs.s3_proxy_run(c, c1)),
            ("s3_c8_p8", lambda c: runs.s3_proxy_run(c, c8, part_size=c8)),
        ]
    if "s3" in stores and args.config_rows:
        # One-line config changes already exposed by the proxy, measured as rows.
        when_required = {"APP__STORAGE__S3__CHECKSUM_MODE": "when_required"}
        jobs += [
            ("s3_plain_p16", lambda c: runs.s3_proxy_run(c, None, part_size=16 * MIB)),
            ("s3_plain_wr", lambda c: runs.s3_proxy_run(c, None, config=when_required)),
            ("s3_plain_if4", lambda c: runs.s3_proxy_run(
                c, None, config={"APP__STORAGE__PARTS_IN_FLIGHT": "4"})),
            ("s3_c8_p8_wr", lambda c: runs.s3_proxy_run(c, c8, part_size=c8,
                                                        config=when_required)),
        ]
    if "filesystem" in stores:
        jobs += [
            ("fs_reference", runs.fs_reference_run),
            ("fs_plain", lambda c: runs.fs_proxy_run(c, None)),
            ("fs_c8", lambda c: runs.fs_proxy_run(c, c8)),
            ("fs_c1", lambda c: runs.fs_proxy_run(c, c1)),
        ]
    peer_against = "s3_c8"
    if "s3" in stores and not args.no_peer:
        root, why = await asyncio.to_thread(node_dir)
        if root is None:
            notes.append(f"tus rows skipped: {why}")
        else:
            ctx.node_root = root
            ctx.payload_file = ctx.tmp / "payload.bin"
            await asyncio.to_thread(write_payload_file, ctx.payload, args.s3_size,
                                    ctx.payload_file)
            if await tus_present(ctx):
                jobs.append(("s3_tus", lambda c: runs.tus_run(c, "proxy", c8)))
                peer_against = "s3_tus"
                notes.append("the proxy's tus endpoint answers: the peer is compared with "
                             "our tus row (same tus-js-client requests)")
            else:
                notes.append("the proxy has no tus endpoint yet (OPTIONS /files/ gave no "
                             "Tus-Version): the tus row is skipped, and the peer is compared "
                             "with our 8 MiB Content-Range chunks instead")
            jobs.append(("peer", lambda c: runs.tus_run(c, "peer", c8)))
    return jobs, notes, peer_against


async def tus_present(ctx: runs.Ctx) -> bool:
    from . import servers

    root = ctx.tmp / "tus-detect"
    root.mkdir(exist_ok=True)
    proxy = await servers.start_proxy("filesystem", ctx.tmp, "tus-detect", root=root)
    try:
        version = await runs.tus_detect(proxy.url)
    finally:
        await servers.stop_child(proxy)
    return version is not None


async def table_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ctx = runs.Ctx(args, tmp, Payload(args.seed), {})
    jobs, notes, peer_against = await plan(ctx)
    for note in notes:
        log(note)
    results: dict[str, list[runs.RunResult]] = {key: [] for key, _ in jobs}
    # Round-robin over the rows, so a change in the machine's load hits all alike.
    for rep in range(args.repeat):
        log(f"== round {rep + 1} of {args.repeat}")
        for key, job in jobs:
            result = await job(ctx)
            results[key].append(result)
            log(result.summary())
    rows = {key: report.Row(key, rs) for key, rs in results.items()}
    lines = [
        f"Upload benchmark: S3 (moto) {human_size(args.s3_size)}, filesystem "
        f"{human_size(args.size)}; median (min-max) of {args.repeat} runs; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
        f"Python {platform.python_version()}",
        "MB/s = 10^6 bytes per wall second; CPU-s/GiB and peak RSS of the server process "
        "(of the boto3 process for the direct row); S3/chunk = S3 calls per client request "
        "from the proxy's own /metrics (upload_proxy_s3_request_duration_seconds_count by "
        "operation, read before and after), mid-way probes excluded, per S3 part for plain "
        "PUTs; (writes) = the calls among them that write",
        *notes,
        "",
        *report.table(list(rows.values())),
    ]
    line, targets = report.summary(rows, peer_against)
    lines += ["", "targets (issue #11):", *targets, "", line]
    failures = [f"  {r.label}: {r.error or [k for k, v in r.checks.items() if not v]}"
                for rs in results.values() for r in rs if not r.ok]
    if failures:
        lines += ["", "failures:", *failures]
    return {"lines": lines, "ok": not failures,
            "json": {key: row.to_json() for key, row in rows.items()}}


async def main_async(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child.
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    tmp = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    started = time.monotonic()
    out: list[str] = []
    doc: dict[str, Any] = {}
    ok = True
    try:
        if args.what in ("all", "table"):
            got = await table_run(args, tmp)
            out += got["lines"]
            doc["table"] = got["json"]
            ok &= got["ok"]
        if args.what in ("all", "concurrency"):
            got = await concurrency.run(args, tmp)
            out += ["", *got["lines"]]
            doc["concurrency"] = got["json"]
            ok &= got["ok"]
        if args.what == "profile":
            got = await profile.run(args, tmp)
            out += got["lines"]
            ok &= got["ok"]
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)
        loop.remove_signal_handler(signal.SIGTERM)
    out.append(f"(benchmark took {time.monotonic() - started:.0f} s)")
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print("\n".join(out))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark the upload proxy against same-machine references (issue #11).")
    parser.add_argument("what", nargs="?", default="all",
                        choices=("all", "table", "concurrency", "profile"),
                        help="all (default) = table + concurrency; profile = py-spy on the "
                             "S3 proxy (plain PUT and 8 MiB chunks)")
    parser.add_argument("--size", type=parse_size, default=128 * MIB,
                        help="bytes uploaded to the filesystem store (default 128MiB)")
    parser.add_argument("--s3-size", type=parse_size, default=128 * MIB,
                        help="bytes uploaded through moto and to the floor (default 128MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (default 3)")
    parser.add_argument("--store", choices=("filesystem", "s3", "both"), default="both",
                        help="stores of the table (default both)")
    parser.add_argument("--direct-part-size", type=parse_size, default=6 * MIB,
                        help="part size of the direct boto3 upload (default 6MiB, the "
                             "proxy's part_size)")
    parser.add_argument("--no-peer", action="store_true", help="skip the node tus rows")
    parser.add_argument("--config-rows", action="store_true",
                        help="add S3 rows with config changes (part_size 16MiB, checksum_mode "
                             "when_required, parts_in_flight 4)")
    concurrency.add_arguments(parser)
    profile.add_arguments(parser)
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the data block")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not Path("/proc/self/stat").exists():
        parser.error("needs Linux /proc to read process CPU and memory")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    raise_fd_limit()
    try:
        return asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130


