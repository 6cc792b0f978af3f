"""What one upload connection costs in memory while it waits for the memory
budget: ``python scripts/connection_memory.py [--connections 50 200]``.

A ``python -m app`` on S3 (a moto server started here) gets a budget of two
parts. Two uploads take it and stall mid-part, holding it; then N uploads
send as fast as they can. Each reads a chunk, waits for a part buffer and
stops reading its socket; its client's sends stall once the kernel buffers
are full. The server's RSS is read before and after the N connections: the
difference over N is the per-connection overhead (aiohttp's buffer, the chunk
in hand, the request's objects). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
PART = 5 * MIB
BLOCK = 64 * 1024
#: A client whose send makes no progress for this long is stalled by the server.
STALL_SECONDS = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"upload_proxy_{name} "):
                return float(line.split()[1])
    raise SystemExit(f"no metric {name}")


def open_upload(port: int, name: str, size: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = (f"PUT /upload/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {size}\r\nContent-Type: application/octet-stream\r\n\r\n")
    sock.sendall(head.encode())
    return sock


def send_until_stalled(sock: socket.socket, stalled: threading.Event, sent: list[int]) -> None:
    block = os.urandom(BLOCK)
    sock.settimeout(STALL_SECONDS)
    try:
        while True:
            sent[0] += sock.send(block)
    except TimeoutError:
        stalled.set()
    except OSError as exc:
        print(f"a connection failed: {exc}", file=sys.stderr)
        stalled.set()


def wait_metric(port: int, name: str, value: float, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(port, name) < value:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} never reached {value}")
        time.sleep(0.2)


def measure(port: int, pid: int, count: int, round_no: int) -> dict[str, float]:
    base = rss_kib(pid)
    socks, events, sent = [], [], []
    for i in range(count):
        sock = open_upload(port, f"r{round_no}-blocked-{i}", 1024 * MIB)
        done, counter = threading.Event(), [0]
        threading.Thread(target=send_until_stalled, args=(sock, done, counter),
                         daemon=True).start()
        socks.append(sock)
        events.append(done)
        sent.append(counter)
    wait_metric(port, "memory_waiting_requests", count)
    for event in events:
        event.wait()
    after = rss_kib(pid)
    result = {
        "connections": count,
        "rss_before_mib": base / 1024,
        "rss_after_mib": after / 1024,
        "per_connection_kib": (after - base) / count,
        "client_sent_kib": sum(c[0] for c in sent) / count / 1024,
        "waiting": metric(port, "memory_waiting_requests"),
    }
    for sock in socks:
        sock.close()
    return result


def run_app(endpoint: str, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP__")}
    env.update({
        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
        "APP__STORAGE__BACKEND": "s3", "APP__STORAGE__S3__BUCKET": "conn",
        "APP__STORAGE__S3__ENDPOINT_URL": endpoint,
        "APP__STORAGE__S3__ADDRESSING_STYLE": "path",
        "APP__STORAGE__PART_SIZE": str(PART),
        "APP__STORAGE__MEMORY_BUDGET": str(2 * PART),
        "APP__STORAGE__CHECKSUM_BUFFER": str(MIB),
        "APP__STORAGE__BUDGET_WAIT": "10m",
        "APP__SERVER__READ_TIMEOUT": "10m",
        "APP__SERVER__DEMO_PAGE": "false",
        "APP__LOGGING__LEVEL": "WARNING",
    })
    app = subprocess.Popen(
        [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env)
    wait_for(f"http://127.0.0.1:{port}/healthz")
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[50, 200])
    args = parser.parse_args()
    moto_port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = []
    try:
        endpoint = f"http://127.0.0.1:{moto_port}"
        wait_for(f"{endpoint}/")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="x", aws_secret_access_key="x").create_bucket(
                         Bucket="conn")
        for round_no, count in enumerate(args.connections):
            # A fresh server each time: waiters whose client left keep waiting.
            port = free_port()
            app = run_app(endpoint, port)
            try:
                # Two uploads a few bytes into their first part hold the whole budget.
                holders = [open_upload(port, f"r{round_no}-holder-{i}", 100 * MIB)
                           for i in range(2)]
                for sock in holders:
                    sock.sendall(b"x" * 4096)
                wait_metric(port, "memory_held_bytes", 2 * PART)
                results.append(measure(port, app.pid, count, round_no))
                for sock in holders:
                    sock.close()
            finally:
                app.terminate()
                app.wait(timeout=30)
        print(json.dumps(results, indent=2))
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
