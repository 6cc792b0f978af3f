"""The upload command against a real ``python -m app`` process that is
restarted (SIGTERM, then started again on the same port) mid-upload: the
client rides it out and the file arrives intact."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from tests.client.faults import FaultRelay
from tests.client.support import MIB, data_of
from tests.client.test_cli import finish, start_cli
from tests.test_shutdown import Server


async def test_server_restart_mid_upload(tmp_path: Path) -> None:
    data = data_of(16 * MIB + 7, seed=13)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    server = Server(tmp_path / "data", tmp_path / "server.log")
    await asyncio.to_thread(server.start)
    restarted: list[asyncio.Future[None]] = []

    async def stop_then_start() -> None:
        code, _ = await asyncio.to_thread(server.stop, signal.SIGTERM)
        assert code == 0, server.log()
        # The relay forwards again (into a dead connection) while the server comes back.
        restarted.append(asyncio.ensure_future(asyncio.to_thread(server.start)))

    def at_four_mib() -> asyncio.Future[None]:
        # Nothing more reaches the server until it has gone down, so the
        # upload cannot finish first.
        return asyncio.ensure_future(stop_then_start())

    try:
        async with FaultRelay(server.port, watches=[(4 * MIB, at_four_mib)]) as relay:
            proc = await start_cli(str(path), f"{relay.url}/upload/r/big.bin", "--retries", "30",
                                   "--backoff", "0.1", "--progress", "plain", "--interval", "60")
            code, out, err = await finish(proc)
            assert restarted
            await restarted[0]
        assert code == 0, err + server.log()
        assert "retrying in" in err, err
        relay.check_no_resend_after_ack()
        assert json.loads(out)["size"] == len(data)
        assert (tmp_path / "data" / "r" / "big.bin").read_bytes() == data
    finally:
        server.kill()
