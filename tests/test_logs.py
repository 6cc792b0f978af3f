"""Log lines cannot be forged by what clients send."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from app.config import config_from_mapping
from app.ops.logs import JsonFormatter, TextFormatter, escape_controls
from app.service import create_app


def test_escape_controls_keeps_printable_text_and_escapes_the_rest() -> None:
    assert escape_controls("videos/a b.mp4") == "videos/a b.mp4"
    assert escape_controls("a\r\nb\x00c\x1b[31m") == "a\\r\\nb\\x00c\\x1b[31m"
    assert escape_controls("naïve ✓") == "naïve ✓"


def test_a_traceback_keeps_its_lines_but_the_message_does_not() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("app", logging.ERROR, __file__, 1, "bad %s", ("x\ny",),
                                   exc_info=__import__("sys").exc_info())
    record.upload_name = "n\r\nm"
    text = TextFormatter().format(record)
    first, *rest = text.split("\n")
    assert "bad x\\ny" in first and "upload_name=n\\r\\nm" in first
    assert rest and rest[-1].startswith("ValueError: boom")


async def test_crlf_in_a_path_writes_one_access_line(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    config = config_from_mapping({"storage": {"filesystem": {"root": str(tmp_path / "d")}}})
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    forged = "/upload/a%0D%0A2026-12-01 12:00:00,000 INFO app.access: PUT /upload/x 200"
    try:
        async with aiohttp.ClientSession() as http, http.put(
            f"http://127.0.0.1:{port}{forged}", data=b"x"
        ) as resp:
            assert resp.status == 400
    finally:
        await runner.cleanup()
    access = [r for r in caplog.records if r.name == "app.access"]
    assert len(access) == 1
    text = TextFormatter().format(access[0])
    assert "\n" not in text and "\r" not in text
    assert "a\\r\\n2026-12-01" in text
    assert "\n" not in JsonFormatter().format(access[0])
