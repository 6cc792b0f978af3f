"""A threaded TCP relay that tests switch off and on to make a backend vanish
for real: new connections are refused and open ones are cut. With
``hold_after`` it forwards only that many bytes towards the target and then
holds the rest (``held`` is set), so a test acts at a byte count, not a time."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class TcpRelay:
    def __init__(self, target_host: str, target_port: int, *,
                 hold_after: int | None = None) -> None:
        self._target = (target_host, target_port)
        self._hold_after = hold_after
        #: Set once ``hold_after`` bytes have been forwarded towards the target.
        self.held = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._port = 0
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def __enter__(self) -> TcpRelay:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Listen (again) on the same port."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self._port))
        listener.listen(64)
        self._stopping.clear()
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        self._stopping.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst, limit in ((client, upstream, self._hold_after),
                                    (upstream, client, None)):
                threading.Thread(target=self._pump, args=(src, dst, limit), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        try:
            while data := src.recv(65536):
                if limit is not None and len(data) >= limit:
                    dst.sendall(data[:limit])
                    self.held.set()
                    self._stopping.wait()  # the rest is held until the relay stops
                    return
                if limit is not None:
                    limit -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
