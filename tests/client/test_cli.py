"""``python -m app upload`` as a real subprocess: exit codes, non-TTY output,
cuts through the fault relay, and Ctrl-C (SIGINT at a byte count seen at the
relay) that pauses to a state file, then the printed command that resumes."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import sys
from pathlib import Path

import pytest

from app.client import cli
from tests.client.faults import FaultRelay, StubProxy
from tests.client.support import KIB, MIB, ROOT, child_env, data_of, stored


async def start_cli(*args: str, stdin: bytes | None = None,
                    cwd: Path | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "upload", *args, cwd=cwd or ROOT, env=child_env(),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def finish(proc: asyncio.subprocess.Process,
                 stdin: bytes | None = None) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_cli(*args: str, stdin: bytes | None = None,
                  cwd: Path | None = None) -> tuple[int, str, str]:
    return await finish(await start_cli(*args, stdin=stdin, cwd=cwd), stdin)


async def test_file_upload_plain_output(proxy, store_harness, tmp_path: Path) -> None:
    data = data_of(2 * MIB + 3)
    path = tmp_path / "clip.bin"
    path.write_bytes(data)
    code, out, err = await run_cli(str(path), f"{proxy.url}/upload/cli/clip.bin",
                                   "--interval", "0", "--header", "X-Test: 1")
    assert code == 0, err
    assert json.loads(out)["size"] == len(data)
    lines = err.splitlines()
    assert lines and all(line.startswith("clip.bin: ") for line in lines), err
    assert "\r" not in err and "\x1b" not in err
    assert any(" of 2.0 MiB (" in line and "/s" in line for line in lines), err
    assert lines[-1].startswith(f"clip.bin: done: {len(data)} bytes in ")
    assert await stored(store_harness, "cli/clip.bin") == data


@pytest.mark.parametrize("store_kind", ["filesystem"], indirect=True)
async def test_progress_bar(proxy, tmp_path: Path) -> None:
    """What a terminal gets (forced here, since the test's stderr is a pipe)."""
    path = tmp_path / "bar.bin"
    path.write_bytes(data_of(MIB))
    code, out, err = await run_cli(str(path), f"{proxy.url}/upload/cli/bar.bin",
                                   "--progress", "bar")
    assert code == 0, err
    assert json.loads(out)["size"] == MIB
    assert "\r" in err and "bar.bin: 100%" in err and "1.00M/1.00M" in err, err


async def test_stdin_of_unknown_length(proxy, store_harness) -> None:
    data = data_of(MIB + 54321)
    code, out, err = await run_cli("-", f"{proxy.url}/upload/cli/stdin.bin",
                                   "--chunk-size", "256KiB", "--progress", "none", stdin=data)
    assert code == 0, err
    assert json.loads(out)["size"] == len(data)
    assert await stored(store_harness, "cli/stdin.bin") == data


@pytest.mark.parametrize("store_kind", ["filesystem"], indirect=True)
async def test_exit_codes(proxy, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    url = f"{proxy.url}/upload/cli/f.bin"
    bad_state = tmp_path / "bad.json"
    bad_state.write_text("{}")
    code, _, err = await run_cli(str(path), url, "--chunk-size", "100")
    assert code == 2 and "multiple of 256 KiB" in err, err
    # The other usage errors in this process (argparse exits with 2).
    for args in ([str(path), url, "--chunk-size", "lots"],
                 [str(tmp_path / "missing"), url],
                 [str(path), url, "--header", "no-colon"],
                 [str(path), url, "--resume", str(bad_state)],
                 [str(path)]):
        with pytest.raises(SystemExit) as info:
            cli.main(args)
        assert info.value.code == 2, args
    # Nothing listens there: fails after its retries.
    code, _, err = await run_cli(str(path), "http://127.0.0.1:9/upload/x", "--retries", "1",
                                 "--backoff", "0")
    assert code == 1 and "upload failed: gave up after 1 retries" in err, err
    # A 4xx is not retried.
    code, _, err = await run_cli(str(path), f"{proxy.url}/upload/.uploads/x")
    assert code == 1 and "refused the upload (400)" in err, err


async def test_cut_three_times_through_the_relay(proxy, store_harness, tmp_path: Path) -> None:
    data = data_of(20 * MIB + 12345, seed=9)
    path = tmp_path / "movie.bin"
    path.write_bytes(data)
    faults = [(5 * MIB, "cut"), (10 * MIB + 4321, "cut"), (15 * MIB + 77, "cut")]
    async with FaultRelay(proxy.port, faults=faults) as relay:
        code, out, err = await run_cli(str(path), f"{relay.url}/upload/cli/movie.bin",
                                       "--backoff", "0.05", "--interval", "0.2")
    assert code == 0, err
    assert len(relay.acted) == 3
    relay.check_no_resend_after_ack()
    print(f"\n$ python -m app upload movie.bin {relay.url}/upload/cli/movie.bin\n{err}{out}"
          f"file {len(data)} bytes; body bytes received by the relay {relay.received}, "
          f"forwarded to the server {relay.forwarded}")
    assert err.count("retrying in") == 3
    assert json.loads(out)["size"] == len(data)
    assert await stored(store_harness, "cli/movie.bin") == data


@pytest.mark.parametrize("chunk", [None, "1MiB"], ids=["one-request", "chunks"])
async def test_ctrl_c_pauses_then_resumes(proxy, store_harness, tmp_path: Path, chunk) -> None:
    data = data_of(12 * MIB + 999, seed=11)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    proc: asyncio.subprocess.Process | None = None

    def interrupt() -> None:
        assert proc is not None
        proc.send_signal(signal.SIGINT)

    async with FaultRelay(proxy.port, watches=[(1536 * KIB, interrupt)]) as relay:
        args = [str(path), f"{relay.url}/upload/cli/big.bin", "--progress", "none"]
        if chunk:
            args += ["--chunk-size", chunk]
        proc = await start_cli(*args, cwd=tmp_path)
        code, out, err = await finish(proc)
        assert code == 130, err
        assert out == ""
        state_file = tmp_path / "big.bin.upload-state.json"
        state = json.loads(state_file.read_text())
        assert 0 <= state["offset"] < len(data), state
        if chunk:
            # The chunk in flight when the signal came was answered first.
            assert state["offset"] >= 2 * MIB and state["offset"] % MIB == 0, state
        command = err.strip().splitlines()[-1]
        assert command.startswith("resume with: python -m app upload "), err
        argv = shlex.split(command.removeprefix("resume with: "))
        assert argv[-2:] == ["--resume", str(state_file.name)]
        requests_before = len(relay.requests())
        code, out, err = await run_cli(*argv[4:], cwd=tmp_path)
        assert code == 0, err
        # The second process starts with a probe and sends only what was missing.
        resumed = relay.requests()[requests_before:]
        assert resumed[0].content_range and resumed[0].content_range.startswith("bytes */")
        assert resumed[1].start == state["offset"]
        relay.check_no_resend_after_ack()
    assert json.loads(out)["size"] == len(data)
    assert not state_file.exists()
    assert await stored(store_harness, "cli/big.bin") == data


async def test_giving_up_saves_the_state_for_later(proxy, store_harness, tmp_path: Path) -> None:
    data = data_of(2 * MIB + 1, seed=12)
    path = tmp_path / "late.bin"
    path.write_bytes(data)
    # The initiation and three chunks go through, then the server is "down".
    async with StubProxy(proxy.url, fail_from=5, retry_after="0") as stub:
        code, _, err = await run_cli(str(path), f"{stub.url}/upload/cli/late.bin",
                                     "--chunk-size", "256KiB", "--retries", "2",
                                     "--progress", "none", cwd=tmp_path)
        assert code == 1, err
        assert "upload failed: gave up after 2 retries" in err, err
        state = json.loads((tmp_path / "late.bin.upload-state.json").read_text())
        assert state["offset"] == 3 * 256 * KIB
        stub.fail_from = None
        argv = shlex.split(err.strip().splitlines()[-1].split("resume with: ", 1)[1])
        code, out, err = await run_cli(*argv[4:], cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["size"] == len(data)
    assert await stored(store_harness, "cli/late.bin") == data
