"""A TCP relay in front of the proxy that drops one client connection once a
set number of bytes went from clients to the proxy: a link dying mid-body at
an exact byte, for clients the test cannot reach into (tus-js-client)."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class CuttingRelay:
    def __init__(self, target_port: int, cut_at: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._cut_at = cut_at
        self._lock = threading.Lock()
        self._forwarded = 0
        #: Set once the cut happened; ``cut_bytes`` is then where.
        self.cut = threading.Event()
        self.cut_bytes = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CuttingRelay:
        self._spawn(self._accept)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._listener.close()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._spawn(self._pump, client, upstream, True)
            self._spawn(self._pump, upstream, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if to_server:
                    data, cutting = self._admit(data)
                    if data:
                        dst.sendall(data)
                    if cutting:
                        break
                else:
                    dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _admit(self, data: bytes) -> tuple[bytes, bool]:
        """The part of ``data`` to forward, and whether to cut after it."""
        with self._lock:
            if self.cut.is_set() or self._forwarded + len(data) < self._cut_at:
                self._forwarded += len(data)
                return data, False
            keep = self._cut_at - self._forwarded
            self._forwarded = self._cut_at
            self.cut_bytes = self._cut_at
            self.cut.set()
            return data[:keep], True
