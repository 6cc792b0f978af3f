"""A TCP relay that cuts the connection once, when the client has sent a
given number of bytes through it: a real socket cut mid-body, at a byte
count rather than at a moment."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class CuttingRelay:
    def __init__(self, target_port: int, cut_after: int | None) -> None:
        self._target = ("127.0.0.1", target_port)
        #: Client-to-server bytes after which the connection carrying them is
        #: cut (once); None: never cut.
        self._cut_after = cut_after
        self._sent = 0
        self._lock = threading.Lock()
        self.cut = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CuttingRelay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _budget(self, size: int) -> int | None:
        """How many of ``size`` bytes may pass; None: all of them."""
        with self._lock:
            if self._cut_after is None or self.cut.is_set():
                return None
            room = self._cut_after - self._sent
            if size < room:
                self._sent += size
                return None
            self._sent += max(room, 0)
            self.cut.set()
            return max(room, 0)

    def _up(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                budget = self._budget(len(data))
                if budget is None:
                    dst.sendall(data)
                    continue
                dst.sendall(data[:budget])
                break
        except OSError:
            pass
        _close(src, dst)

    @staticmethod
    def _down(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _close(src, dst)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
