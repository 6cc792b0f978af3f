"""An HTTP fault proxy in front of moto: it fails or holds the S3 requests a
test picks (by method, path and body), every attempt of them, and forwards the
rest unchanged. botocore's own retries absorb a single failure, so a rule
fails each matching attempt until the test removes it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>fault injected by the test</Message></Error>"
)
#: Hop-by-hop or recomputed headers that must not be copied across.
_SKIP_REQUEST = frozenset({"host", "content-length", "transfer-encoding", "expect", "connection"})
_SKIP_RESPONSE = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass
class Rule:
    method: str
    #: A substring of the path (and query) the request must contain.
    path: str
    #: A substring its body must contain (None: any body).
    body: bytes | None = None
    action: Literal["fail", "hold"] = "fail"
    #: Requests this rule acted on.
    hits: int = 0
    #: Set when a request is being held (``action == "hold"``: held until
    #: ``release``, then failed).
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    #: Holds end when this is set.
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, method: str, path: str, body: bytes) -> bool:
        return (method == self.method and self.path in path
                and (self.body is None or self.body in body))


class S3FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules: list[Rule] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    async def __aenter__(self) -> S3FaultProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for rule in self.rules:
            rule.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        for rule in list(self.rules):
            if rule in self.rules and rule.matches(request.method, request.path_qs, body):
                rule.hits += 1
                if rule.action == "fail":
                    return web.Response(status=503, body=SLOW_DOWN,
                                        content_type="application/xml")
                # Held, then failed: a held request never reaches moto, so a
                # process killed meanwhile never made that write.
                rule.holding.set()
                await rule.release.wait()
                return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers,
            data=body if body else None, allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _SKIP_RESPONSE}
            if request.method == "HEAD":
                # The object's size is in the header; there is no body to count.
                response = web.StreamResponse(status=upstream.status, headers=out)
                response.content_length = int(upstream.headers.get("Content-Length", "0"))
                await response.prepare(request)
                await response.write_eof()
                return response
            return web.Response(status=upstream.status, body=payload, headers=out)
