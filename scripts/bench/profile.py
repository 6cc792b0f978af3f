"""py-spy on the S3 proxy during a plain PUT and during 8 MiB chunks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profile")
    g.add_argument("--profile-dir", type=Path, default=None,
                   help="keep py-spy's raw profiles here (default: a temp dir)")


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    return {"lines": ["profile: not yet"], "ok": False}
