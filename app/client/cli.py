"""``python -m app upload FILE|- URL`` (also ``upload-proxy``): upload with a
progress bar; Ctrl-C pauses and prints the command that resumes.

Exit codes: 0 done, 1 failed (after retries, or refused), 2 usage error, 130 paused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, BinaryIO

from app.client.api import Uploader
from app.client.core import DEFAULT_STALL_TIMEOUT, validate_chunk_size
from app.client.errors import RetriesExhausted, UploadClientError, UploadPaused
from app.client.progress import Completed, Event, Progress, Resumed, Retrying
from app.client.state import SessionState

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PAUSED = 0, 1, 2, 130

_UNITS = MappingProxyType({
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
    "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
})
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8MiB, 262144)")
    return int(match.group(1)) * _UNITS[unit]


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"a header is NAME:VALUE, not {text!r}")
    return name.strip(), value.strip()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Upload a file (or stdin) to the resumable upload proxy, "
        "or to a GCS-style resumable session URL. Ctrl-C pauses; --resume continues.")
    parser.add_argument("file", metavar="FILE|-", help="file to upload, or - for stdin")
    parser.add_argument("url", metavar="URL", help="e.g. http://127.0.0.1:8080/upload/videos/a.mp4")
    parser.add_argument("--chunk-size", type=parse_size, default=None,
                        help="send Content-Range chunks of this size (a multiple of 256KiB); "
                        "default one request, or 8MiB chunks for stdin")
    parser.add_argument("--header", type=parse_header, action="append", default=[],
                        metavar="K:V", help="extra request header (repeatable)")
    parser.add_argument("--content-type", default=None)
    parser.add_argument("--resume", metavar="STATE_FILE", default=None,
                        help="continue the upload saved in STATE_FILE")
    parser.add_argument("--state-file", default=None,
                        help="where Ctrl-C saves the state (default: the --resume file, "
                        "else ./<name>.upload-state.json)")
    parser.add_argument("--retries", type=int, default=8,
                        help="consecutive failed attempts allowed without progress")
    parser.add_argument("--backoff", type=float, default=0.5, help="first backoff, seconds")
    parser.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT,
                        help="seconds without progress before a request is dropped")
    parser.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                        help="auto: a bar on a terminal, plain lines otherwise")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between plain progress lines")
    return parser


class Reporter:
    """Turns events into a tqdm bar or periodic plain lines on ``out``."""

    def __init__(self, mode: str, out: IO[str], interval: float, label: str) -> None:
        self.mode = mode
        self.out = out
        self.interval = interval
        self.label = label
        self._bar: Any = None
        self._last_line = -float("inf")

    def __call__(self, event: Event) -> None:
        if self.mode == "none":
            return
        if isinstance(event, Retrying):
            self._line(f"{event.error}; retrying in {event.delay:.1f}s "
                       f"(attempt {event.attempt}, {human(event.acknowledged)} stored)")
        elif isinstance(event, Resumed):
            if self._bar is not None:
                self._bar.update(event.offset - self._bar.n)
            if event.offset:
                self._line(f"server has {human(event.offset)}; continuing from byte {event.offset}")
        elif isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, Completed):
            if self._bar is not None:
                self._bar.update(event.size - self._bar.n)
                self._bar.close()
                self._bar = None
            rate = event.size / event.elapsed if event.elapsed > 0 else 0.0
            self._line(f"done: {event.size} bytes in {event.elapsed:.1f}s ({human(rate)}/s), "
                       f"{event.sent} bytes sent")

    def _progress(self, event: Progress) -> None:
        if self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=event.total, unit="B", unit_scale=True, unit_divisor=1024,
                                 file=self.out, desc=self.label, dynamic_ncols=True)
            self._bar.update(event.position - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_line < self.interval:
            return
        self._last_line = now
        if event.total:
            share = f" of {human(event.total)} ({100 * event.position / event.total:.0f}%)"
        else:
            share = ""
        eta = f", ETA {event.eta:.0f}s" if event.eta is not None else ""
        self._line(f"sent {human(event.position)}{share}, {human(event.rate)}/s{eta}, "
                   f"{human(event.acknowledged)} stored")

    def _line(self, text: str) -> None:
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.write(text, file=self.out)
        else:
            print(f"{self.label}: {text}", file=self.out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def default_state_file(file: str, url: str) -> Path:
    base = Path(file).name if file != "-" else url.rstrip("/").rsplit("/", 1)[-1] or "stdin"
    return Path(re.sub(r"[^A-Za-z0-9._-]", "_", base) + ".upload-state.json")


def resume_command(prog: str, argv: list[str], state_file: Path) -> str:
    """The same command line with ``--resume STATE_FILE`` (replacing an earlier one)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume="):
            continue
        out.append(arg)
    return " ".join([prog, shlex.join([*out, "--resume", str(state_file)])])


async def _run(args: argparse.Namespace, uploader: Uploader) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\npausing (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)
            uploader.pause()
        else:
            task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await uploader.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def main(argv: list[str] | None = None, prog: str = "upload-proxy") -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.chunk_size is not None:
        try:
            validate_chunk_size(args.chunk_size)
        except ValueError as exc:
            parser.error(str(exc))
    state = None
    if args.resume:
        try:
            state = SessionState.load(args.resume)
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read the state file {args.resume}: {exc}")
    source: BinaryIO
    if args.file == "-":
        source = sys.stdin.buffer
    else:
        try:
            source = open(args.file, "rb")
        except OSError as exc:
            parser.error(f"cannot open {args.file}: {exc.strerror or exc}")
    state_file = Path(args.state_file or args.resume or default_state_file(args.file, args.url))
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "plain"
    label = Path(args.file).name if args.file != "-" else "stdin"
    reporter = Reporter(mode, sys.stderr, args.interval, label)
    uploader = Uploader(
        args.url, source, chunk_size=args.chunk_size, headers=dict(args.header),
        content_type=args.content_type, on_progress=reporter, retries=args.retries,
        backoff=args.backoff, stall_timeout=args.stall_timeout, state=state,
    )
    def save(state: SessionState) -> None:
        state.save(state_file)
        if args.file == "-":
            print(f"feed the bytes from offset {state.offset} on to stdin, e.g. "
                  f"tail -c +{state.offset + 1} FILE | ...", file=sys.stderr)
        print(f"resume with: {resume_command(prog, argv, state_file)}", file=sys.stderr)

    def save_if_started() -> None:
        # The server keeps what it acknowledged, so the upload can go on later.
        engine = uploader.engine
        if engine is not None and engine.started:
            print(f"state saved to {state_file} (at byte {engine.acked})", file=sys.stderr)
            save(engine.state())

    try:
        result = asyncio.run(_run(args, uploader))
    except UploadPaused as paused:
        reporter.close()
        total = paused.state.total
        print(f"paused at byte {paused.state.offset}"
              f"{f' of {total}' if total is not None else ''}; state saved to {state_file}",
              file=sys.stderr)
        save(paused.state)
        return EXIT_PAUSED
    except (asyncio.CancelledError, KeyboardInterrupt):
        # A second Ctrl-C, or one before the upload had begun.
        reporter.close()
        print("stopped", file=sys.stderr)
        save_if_started()
        return EXIT_PAUSED
    except RetriesExhausted as exc:
        reporter.close()
        print(f"upload failed: {exc.message}", file=sys.stderr)
        save_if_started()
        return EXIT_FAILED
    except UploadClientError as exc:
        reporter.close()
        print(f"upload failed: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        reporter.close()
        print(f"upload failed: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    reporter.close()
    print(json.dumps(result), flush=True)
    if args.resume:
        Path(args.resume).unlink(missing_ok=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
