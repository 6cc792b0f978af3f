"""Running the real app on a real port for end-to-end tests, and raw-socket clients."""

from __future__ import annotations

import asyncio
import socket
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

    async def start(self, authorizer: Authorizer | None = None, **sections: Any) -> Proxy:
        config = replace(self.config, **sections) if sections else self.config
        runner = web.AppRunner(
            create_app(config, authorizer=authorizer), shutdown_timeout=5, access_log=None
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
