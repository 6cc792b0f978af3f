"""Real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright for
Python; the browser tests skip, with the reason printed, only where either is
missing. Screenshots are kept under ``artifacts/screenshots/`` at the repo root."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
#: The launch flags this machine needs: no sandbox as root, and no background
#: traffic to hosts the closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _skip(reason: str) -> None:
    print(reason)
    pytest.skip(reason)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[object]:
    """A fresh persistent context (its own --user-data-dir) in headless Chromium."""
    if shutil.which(CHROMIUM) is None:
        _skip(f"Chromium not installed at {CHROMIUM}: skipping the browser tests")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _skip("Playwright for Python is not installed: skipping the browser tests")
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1100, "height": 720},
        )
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
def screenshot_path() -> object:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def path(name: str) -> str:
        return str(SCREENSHOTS / f"{name}.png")

    return path
