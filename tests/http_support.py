"""Running the real app on a real port for end-to-end tests, and raw-socket clients."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from app.auth.webhook import Authorizer
from app.config import Config, replace
from app.service import create_app


@dataclass
class Proxy:
    """One running proxy process (in-process: an AppRunner on a free port)."""

    config: Config
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def app(self) -> web.Application:
        return self.runner.app

    async def stop(self) -> None:
        await self.runner.cleanup()


@dataclass
class ProxyFactory:
    """Starts proxies over one backing storage; each is a 'process' of its own."""

    config: Config
    running: list[Proxy] = field(default_factory=list)

    async def start(self, authorizer: Authorizer | None = None,
                    clock: Callable[[], float] = time.time, **sections: Any) -> Proxy:
        config = replace(self.config, **sections) if sections else self.config
        runner = web.AppRunner(
            create_app(config, authorizer=authorizer, clock=clock), shutdown_timeout=5,
            access_log=None,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        proxy = Proxy(config, runner, port)
        self.running.append(proxy)
        return proxy

    async def stop_all(self) -> None:
        for proxy in self.running:
            await proxy.stop()
        self.running.clear()


def raw_request(port: int, head: str, body: bytes = b"", *, close_after_body: bool = True) -> bytes:
    """Send a request over a plain socket (blocking; run it in a thread) and
    return whatever the server answered before the socket closed. With
    ``close_after_body`` the socket is closed right after ``body``, which cuts
    the connection mid-body when ``body`` is shorter than Content-Length."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        if close_after_body:
            return b""
        sock.settimeout(30)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


async def cut_upload(port: int, name: str, body: bytes, declared: int,
                     extra_headers: str = "") -> None:
    """PUT ``name`` declaring ``declared`` bytes, send ``body`` and drop the connection."""
    head = (f"PUT /upload/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {declared}\r\n{extra_headers}Content-Type: video/mp4")
    await asyncio.to_thread(raw_request, port, head, body)


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes this socket has not yet had acknowledged by the peer (Linux)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def unread_by_server(sock: socket.socket) -> int:
    """Bytes the server end of this client connection has received but its
    process has not read yet (its receive queue in /proc/net/tcp, Linux)."""
    client_port = sock.getsockname()[1]
    server_port = sock.getpeername()[1]
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port):
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no server end for the connection from port {client_port}")


async def wait_until_server_read_all(sock: socket.socket, timeout: float = 30) -> None:
    """Until everything sent on ``sock`` has reached the server process (its
    kernel acknowledged it and the process read it off the socket)."""
    async with asyncio.timeout(timeout):
        while unsent_bytes(sock) or unread_by_server(sock):
            await asyncio.sleep(0.02)


def read_head(sock: socket.socket, timeout: float = 30) -> bytes:
    """Read one response head (up to its blank line) off ``sock`` (blocking)."""
    sock.settimeout(timeout)
    head = b""
    while b"\r\n\r\n" not in head:
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    sock.settimeout(None)
    return head
