"""py-spy on the S3 proxy (moto) during a plain PUT and during 8 MiB chunks.

``py-spy record --format raw`` samples the proxy only while the upload runs
(started after the warm-up, stopped with SIGINT when the upload is answered);
the collapsed stacks are then summed per function: *self* is the share of
samples whose innermost Python frame is that function, *total* the share in
which it is anywhere on the stack. Native frames are not sampled, so time in C
(hashing, socket I/O, memcpy) shows as the Python function that called it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import runs
from .common import GIB, MIB, Child, Payload, human_size, parse_size

TOP = 25
_LINE = re.compile(r":[0-9]+\)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profile")
    g.add_argument("--profile-size", type=parse_size, default=GIB,
                   help="bytes per profiled upload (default 1GiB)")
    g.add_argument("--profile-dir", type=Path, default=None,
                   help="keep py-spy's raw profiles here (default: a temp dir)")
    g.add_argument("--profile-rate", type=int, default=250, help="samples per second")


def frame_name(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (file.py)``, shortened to the repo."""
    frame = _LINE.sub(")", frame.strip())
    for cut in ("site-packages/", "/lib/python3.11/", "/work/wt/bench/"):
        if cut in frame:
            head, _, tail = frame.partition("(")
            frame = head + "(" + tail.split(cut, 1)[1]
    return frame


def summarise(raw: Path) -> tuple[int, list[tuple[str, float, float]]]:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f]
        # py-spy puts the thread first ("process ... " / "thread ..."): not a function.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            anywhere[f] += n
    rows = [(f, 100 * own[f] / total, 100 * anywhere[f] / total)
            for f, _ in own.most_common(TOP)] if total else []
    return total, rows


#: Groups of frames (substrings of a stack) whose share docs/performance.md reports.
GROUPS = {
    "aiohttp client sending S3 bodies (write_with_length)": ("write_with_length",),
    "reading the client's body": ("RequestHandler.data_received",
                                  "_read_ready__data_received", "RequestBody._read"),
    "all of botocore/aiobotocore _make_api_call": ("_make_api_call",),
    "  signing (signers, auth, hmac)": ("signers.py", "botocore/auth.py", "hmac.py"),
    "  serialising, validating, parsing": ("serialize.py", "validate.py", "parsers.py",
                                           "botocore/model.py"),
    "new TCP connections (connect, close)": ("_sock_connect", "_real_close",
                                             "create_connection", "BaseConnector.connect"),
    "Records.put (record PutObject)": ("Records.put",),
    "Records.read/load (record GetObject)": ("Records.read", "Records.load"),
    "StagedData (staged tail PUT, fill GET, delete)": ("StagedData.",),
    "Writer._take (copy into the part buffer, CRCs)": ("Writer._take",),
    "crc32c_extend": ("crc32c_extend",),
}


def groups(raw: Path) -> list[tuple[str, float]]:
    hits: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        for name, keys in GROUPS.items():
            if any(k in stack for k in keys):
                hits[name] += n
    return [(name, 100 * hits[name] / total) for name in GROUPS] if total else []


def top_inclusive(raw: Path, project: str = "app/") -> list[tuple[str, float]]:
    """The project's own functions with the largest share of samples anywhere on the stack."""
    anywhere: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        for f in {frame_name(f) for f in stack.split(";") if f}:
            if f"({project}" in f:
                anywhere[f] += n
    return [(f, 100 * c / total) for f, c in anywhere.most_common(TOP)] if total else []


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return {"lines": ["profile: py-spy not installed (pip install py-spy)"], "ok": False}
    out_dir = args.profile_dir or tmp
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = runs.Ctx(args, tmp, Payload(args.seed), {})
    lines: list[str] = []
    ok = True
    for chunk in (None, 8 * MIB):
        tag = "plain" if chunk is None else "chunks-8MiB"
        raw = out_dir / f"pyspy-s3-{tag}.txt"
        holder: dict[str, asyncio.subprocess.Process] = {}

        def hooks(proxy: Child, raw: Path = raw, holder: dict = holder) -> tuple[
                Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
            async def start() -> None:
                holder["p"] = await asyncio.create_subprocess_exec(
                    pyspy, "record", "--pid", str(proxy.pid), "--format", "raw",
                    "--rate", str(args.profile_rate), "--nonblocking", "-o", str(raw),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                await asyncio.sleep(1.0)  # py-spy attaches

            async def stop() -> None:
                proc = holder["p"]
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

            return start, stop

        print(f"== profiling the S3 proxy, {runs.what(chunk)}, "
              f"{human_size(args.profile_size)}", file=sys.stderr, flush=True)
        result = await runs.s3_proxy_run(ctx, chunk, size=args.profile_size, hooks=hooks)
        print(result.summary(), file=sys.stderr, flush=True)
        ok &= result.ok
        lines.append(f"py-spy, S3 proxy {runs.what(chunk)}, {human_size(args.profile_size)} "
                     f"into moto: {result.summary().strip()}")
        if not raw.exists():
            lines.append("  (py-spy wrote no profile)")
            ok = False
            continue
        total, rows = summarise(raw)
        lines.append(f"  {total} samples; {raw}")
        lines.append(f"  {'self %':>7} {'total %':>8}  function (file)")
        lines += [f"  {own:7.1f} {anywhere:8.1f}  {f}" for f, own, anywhere in rows]
        lines.append("  the project's own functions, by share of samples anywhere on the stack:")
        lines += [f"  {'':7} {share:8.1f}  {f}" for f, share in top_inclusive(raw)]
        lines.append("  grouped (share of samples with any of these frames on the stack):")
        lines += [f"  {'':7} {share:8.1f}  {name}" for name, share in groups(raw)]
        lines.append("")
    return {"lines": lines, "ok": ok}
