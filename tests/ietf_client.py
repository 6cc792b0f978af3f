"""A client of the IETF resumable-upload draft written from the draft text,
request by request on a raw socket, so interim (1xx) responses are seen as
they come and a request can be cut at an exact byte.

Blocking: tests run it in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any

TIMEOUT = 30


@dataclass
class Response:
    status: int
    reason: str
    #: Lower-cased names.
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)

    def dictionary(self, name: str) -> dict[str, str]:
        """A structured-field Dictionary header as ``{key: raw value}``."""
        members = (m.strip().partition("=") for m in self.headers[name].split(","))
        return {key: value for key, _, value in members}


@dataclass
class Exchange:
    interim: list[Response] = field(default_factory=list)
    final: Response | None = None


class Connection:
    """One HTTP/1.1 connection read by hand."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(TIMEOUT)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send_head(self, method: str, path: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, *, bodiless: bool = False) -> Response:
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        _, status, reason = [*lines[0].split(" ", 2), ""][:3]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        response = Response(int(status), reason, headers)
        if response.status < 200 or bodiless or response.status in (204, 304):
            return response
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            self._fill()
        response.body, self._buffer = self._buffer[:length], self._buffer[length:]
        return response

    def read_final(self, exchange: Exchange, *, bodiless: bool = False) -> Exchange:
        while True:
            response = self.read_response(bodiless=bodiless)
            if response.status >= 200:
                exchange.final = response
                return exchange
            exchange.interim.append(response)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buffer += data


def request(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> Exchange:
    """One whole request and everything the server answered to it."""
    conn = Connection(port)
    try:
        all_headers = {"Content-Length": str(len(body)), **headers} if body or method in (
            "POST", "PUT", "PATCH") else dict(headers)
        conn.send_head(method, path, {**all_headers, "Connection": "close"})
        conn.send(body)
        return conn.read_final(Exchange(), bodiless=method == "HEAD")
    finally:
        conn.close()


def start_then_cut(
    port: int, method: str, path: str, headers: dict[str, str], declared: int, sent: bytes
) -> Response:
    """Begin a request of ``declared`` content bytes, send only ``sent``, read
    the ``104`` off the socket and drop the connection: the client's view of a
    link that died mid-body after the server announced the upload."""
    conn = Connection(port)
    try:
        conn.send_head(method, path, {**headers, "Content-Length": str(declared)})
        conn.send(sent)
        interim = conn.read_response()
        assert interim.status == 104, (interim.status, interim.body)
        return interim
    finally:
        conn.close()


def path_of(location: str) -> str:
    """The path of an absolute upload URL."""
    return "/" + location.split("://", 1)[1].split("/", 1)[1]
