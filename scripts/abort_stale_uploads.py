#!/usr/bin/env python3
"""Cron entry point for the cleanup job; everything happens in ``app.cleanup``.

    abort_stale_uploads.py --config /etc/upload-proxy/app.yaml --older-than 24h [--dry-run] [--json]

Same as ``python -m app cleanup ...``. Exit 0: done; 1: some action failed;
2: bad arguments or configuration.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Cron runs the file by path: make the project importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ops.cleanup import main

if __name__ == "__main__":
    sys.exit(main(prog="abort_stale_uploads.py"))
