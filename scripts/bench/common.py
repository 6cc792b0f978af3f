"""Shared pieces of the benchmark: sizes, generated data, process readings and
child processes. Linux only (``/proc``)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import os
import random
import re
import resource
import signal
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp
import google_crc32c

REPO = Path(__file__).resolve().parent.parent.parent
HOST = "127.0.0.1"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
#: Generated data comes in blocks of this size; each is one write to the socket.
BLOCK = MIB
CLK_TCK = os.sysconf("SC_CLK_TCK")
RSS_SAMPLE_INTERVAL = 0.05
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
BUCKET = "bench"

_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "kib": KIB, "mib": MIB, "gib": GIB, "tib": 1024 * GIB,
}


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


def proc_cpu_ticks(pid: int) -> float:
    """utime + stime from ``/proc/<pid>/stat``: every thread, the dead ones
    too, but in clock ticks (10 ms)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        text = f.read()
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_ns(pid: int) -> float:
    """The sum of the live threads' run time (``schedstat``), in nanoseconds'
    resolution; a thread that ended between two readings is missing."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
    return total / 1e9


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    return proc_cpu_ticks(pid), proc_cpu_ns(pid)


def cpu_delta(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The fine reading, unless the coarse one shows more than tick noise
    (threads ended in between): then the coarse one."""
    coarse, fine = after[0] - before[0], after[1] - before[1]
    return coarse if coarse - fine > 3 / CLK_TCK else fine


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
        self._cpu0 = (0.0, 0.0)
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
            cpu_s=cpu_delta(self._cpu0, proc_cpu_seconds(self.pid)),
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
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
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
    name: str, argv: list[str], env: dict[str, str], log_path: Path, *, pipes: bool = False,
    cwd: Path = REPO,
) -> Child:
    # The child gets its own descriptor; ours is closed as soon as it has started.
    log = _open_log(log_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
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


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def file_crc(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while data := f.read(4 * MIB):
            crc = google_crc32c.extend(crc, data)
            size += len(data)
    return size, crc


def write_payload_file(payload: Payload, size: int, path: Path) -> None:
    """The generated bytes on disk, for clients (node) that read a file."""
    with open(path, "wb") as f:
        for start in range(0, size, BLOCK):
            for _, data in payload.pieces(start, min(size, start + BLOCK)):
                f.write(data)
