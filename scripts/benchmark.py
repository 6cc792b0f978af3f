#!/usr/bin/env python3
"""Benchmark the upload proxy against references measured in the same run.

    python scripts/benchmark.py [all|table|concurrency|profile] [--s3-size 256MiB]
                                [--size 256MiB] [--repeat 3] [--store both] [--json]

``table``: the S3 store (moto) and the filesystem store, each as a plain PUT,
8 MiB and 1 MiB Content-Range chunks, against the floor (aiohttp discarding
the body), a direct boto3 multipart upload into the same moto, and the Node
peer (@tus/server + @tus/s3-store) driven by tus-js-client. Figures: wall
MB/s, the server's CPU-seconds per GiB, S3 requests per chunk (the proxy's own
``/metrics``), peak RSS; the median (min-max) of ``--repeat`` runs.
``concurrency``: many slow uploads at once, probe latency, peak RSS, and every
stored object checked. ``profile``: py-spy on the S3 proxy. The code lives in
``scripts/bench/``. Linux only (``/proc``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
