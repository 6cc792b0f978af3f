"""pause() in this process, resume() in a real second one; a session that
disappears is refused."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from app.client import (
    Progress,
    ResumableWriter,
    SessionGone,
    SessionState,
    Uploader,
    UploadPaused,
)
from tests.client.support import KIB, MIB, data_of, run_python, stored

RESUME_UPLOAD = """
import asyncio, json, sys
from app.client import SessionState, resume
state = SessionState.load(sys.argv[1])
print(json.dumps(asyncio.run(resume(state, sys.argv[2]))))
"""

RESUME_WRITER = """
import asyncio, json, sys
from app.client import ResumableWriter, SessionState

async def main():
    state = SessionState.load(sys.argv[1])
    data = open(sys.argv[2], "rb").read()[state.offset:]
    async with ResumableWriter(state.url, state=state) as w:
        for i in range(0, len(data), 50_000):
            await w.write(data[i:i + 50_000])
    return w.result

print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.parametrize("chunk_size", [None, 512 * KIB], ids=["one-request", "chunks"])
async def test_pause_then_resume_in_another_process(proxy, store_harness, tmp_path: Path,
                                                    chunk_size) -> None:
    data = data_of(3 * MIB + 1234, seed=5)
    path = tmp_path / "in.bin"
    path.write_bytes(data)
    uploader: Uploader

    def pause_after_a_mib(event: object) -> None:
        if isinstance(event, Progress) and event.position >= MIB:
            uploader.pause()

    uploader = Uploader(f"{proxy.url}/upload/p/a.bin", path, chunk_size=chunk_size,
                        on_progress=pause_after_a_mib)
    with pytest.raises(UploadPaused) as info:
        await uploader.run()
    state = info.value.state
    assert 0 <= state.offset < len(data)
    if chunk_size:
        # The chunk in flight was answered before the pause: 1 MiB exactly.
        assert state.offset == 2 * chunk_size
    state_file = tmp_path / "state.json"
    state.save(state_file)
    assert SessionState.load(state_file) == state

    code, out, err = await run_python(RESUME_UPLOAD, str(state_file), str(path))
    assert code == 0, err
    assert json.loads(out)["size"] == len(data)
    assert await stored(store_harness, "p/a.bin") == data


async def test_writer_pause_then_resume_in_another_process(proxy, store_harness,
                                                           tmp_path: Path) -> None:
    data = data_of(2 * MIB + 99, seed=6)
    path = tmp_path / "in.bin"
    path.write_bytes(data)
    async with ResumableWriter(f"{proxy.url}/upload/p/w.bin", chunk_size=256 * KIB) as w:
        await w.write(data[:MIB + 100])
        state = await w.pause()
    assert state.offset == MIB and state.total is None
    state_file = tmp_path / "state.json"
    state.save(state_file)
    code, out, err = await run_python(RESUME_WRITER, str(state_file), str(path))
    assert code == 0, err
    assert json.loads(out)["size"] == len(data)
    assert await stored(store_harness, "p/w.bin") == data


async def test_cancelled_session_is_refused(proxy) -> None:
    url = f"{proxy.url}/upload/p/gone.bin"
    with pytest.raises(SessionGone):
        async with ResumableWriter(url, chunk_size=256 * KIB) as w:
            await w.write(data_of(300 * KIB))
            assert w.acknowledged == 256 * KIB
            async with aiohttp.ClientSession() as http, http.delete(url) as resp:
                assert resp.status == 204
            await w.write(data_of(300 * KIB))
