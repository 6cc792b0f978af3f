"""A TCP relay between the browser and the service that acts at byte counts.

It counts the bytes going from the browser to the server over all its
connections. When the count reaches a cut point the link goes down: every
open connection is reset and new ones are reset as they come, until the test
calls ``restore()``. (Cutting only one connection is not a dropped link to
Chromium: it silently resends a request whose reused connection failed, and
the page would never know.) At the hold point, the connection stops being
forwarded until ``release()`` cuts it, so a test can act (reload the page)
while an upload is provably mid-request. No timing is involved anywhere.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterable
from types import TracebackType


class CuttingRelay:
    def __init__(self, target_port: int, *, cut_at: Iterable[int] = (),
                 hold_at: int | None = None) -> None:
        self._target = ("127.0.0.1", target_port)
        self._cuts = sorted(cut_at)
        self._hold_at = hold_at
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._held: list[socket.socket] = []
        self._release = threading.Event()
        self.upstream_bytes = 0
        self.cuts_done = 0
        self._down = False
        self._changed = threading.Condition(self._lock)
        #: Set once a connection is held at ``hold_at``.
        self.holding = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CuttingRelay:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._release.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _close(sock, reset=False)

    def wait_down(self, cuts: int, timeout: float = 30) -> bool:
        """Block until the link went down for the ``cuts``-th time."""
        with self._changed:
            return self._changed.wait_for(lambda: self.cuts_done >= cuts and self._down, timeout)

    def restore(self) -> None:
        """The link is back: connections are accepted and forwarded again."""
        with self._changed:
            self._down = False

    def _go_down(self) -> None:
        with self._changed:
            self._down = True
            sockets, self._sockets = self._sockets, []
            self._changed.notify_all()
        for client, upstream in zip(sockets[::2], sockets[1::2], strict=True):
            _cut(client, upstream)

    def release(self) -> None:
        """Cut the held connection; everything after it flows freely."""
        with self._lock:
            held, self._held = self._held, []
        if held:
            _cut(*held)
        self._release.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._down
            if down:
                _close(client, reset=True)
                continue
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._upload, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._download, args=(upstream, client), daemon=True).start()

    def _budget(self, size: int) -> tuple[int, str]:
        """How much of the next ``size`` bytes may pass, and what happens then."""
        with self._lock:
            start = self.upstream_bytes
            if self._cuts and start + size >= self._cuts[0]:
                allowed = self._cuts.pop(0) - start
                self.upstream_bytes += allowed
                self.cuts_done += 1
                return allowed, "cut"
            if self._hold_at is not None and start + size >= self._hold_at:
                allowed = self._hold_at - start
                self._hold_at = None
                self.upstream_bytes += allowed
                return allowed, "hold"
            self.upstream_bytes += size
            return size, "pass"

    def _upload(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                allowed, then = self._budget(len(data))
                upstream.sendall(data[:allowed])
                if then == "cut":
                    self._go_down()
                    return
                if then == "hold":
                    with self._lock:
                        self._held += [client, upstream]
                    self.holding.set()
                    self._release.wait()
                    return
        except OSError:
            pass
        finally:
            _shutdown(upstream)

    @staticmethod
    def _download(upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            _shutdown(client)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _cut(client: socket.socket, upstream: socket.socket) -> None:
    # The browser gets an RST, as from a dropped link; the server side is shut
    # down first so the thread reading it wakes up before its socket closes.
    _close(upstream, reset=False)
    _close(client, reset=True)


def _close(sock: socket.socket, *, reset: bool) -> None:
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
