"""An asyncio TCP relay in front of the proxy that cuts a connection once,
exactly when the bytes clients sent through it reach a count."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class CuttingRelay:
    """Forwards 127.0.0.1:<port> to ``target_port``. When the client-to-server
    bytes summed over every connection reach ``cut_after``, the connection
    carrying that byte is cut: the bytes before it reach the server, then the
    stream ends; the client's side is reset. Later connections pass untouched."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self._target_port = target_port
        self._cut_after = cut_after
        self._server: asyncio.Server | None = None
        self.sent = 0
        self.cuts = 0
        self.connections = 0

        self.url = ""

    async def __aenter__(self) -> CuttingRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            # The server is down: the client must see its connection fail, as
            # it would without the relay, not wait on it forever.
            writer.transport.abort()
            return
        down = asyncio.create_task(self._pump(up_reader, writer))
        try:
            await self._pump_up(reader, up_writer, writer)
        finally:
            down.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await down
            for w in (writer, up_writer):
                w.close()

    async def _pump_up(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter,
                       client: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            room = self._cut_after - self.sent
            if self.cuts == 0 and len(data) >= room:
                upstream.write(data[:room])
                await upstream.drain()
                self.sent += room
                self.cuts += 1
                # The server gets every byte before the cut and then the end
                # of the stream; the client sees its connection reset.
                upstream.close()
                client.transport.abort()
                return
            self.sent += len(data)
            upstream.write(data)
            await upstream.drain()
        if upstream.can_write_eof():
            upstream.write_eof()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        # The server is gone (closed, or killed): the client must see its
        # connection end too, not send into a relay nobody reads.
        writer.close()
