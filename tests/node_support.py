"""npm packages for tests that drive real Node clients, installed once per set.

Packages go into a directory under the system temp dir keyed by the exact
package list, so every test module asking for the same set shares one
install, and a later run on the same machine reuses it. ``node_packages``
skips (with the reason printed) only where ``node``/``npm`` are absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def node_packages(*packages: str, timeout: float = 600) -> Path:
    """A directory whose ``node_modules`` holds ``packages`` (npm specs, e.g.
    ``tus-js-client@4``); scripts run with ``cwd`` there can ``require`` them."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node/npm not installed: skipping the Node client tests"
        print(reason)
        pytest.skip(reason)
    key = hashlib.sha256(json.dumps(sorted(packages)).encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"upload-proxy-node-{key}"
    done = root / ".installed"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text(json.dumps({"name": "node-clients", "private": True}))
    env = {**os.environ, "npm_config_fund": "false", "npm_config_audit": "false",
           "npm_config_update_notifier": "false"}
    result = subprocess.run(
        [npm, "install", "--no-save", "--no-package-lock", *packages],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm install {' '.join(packages)} failed:\n{result.stderr[-2000:]}")
    done.write_text("ok")
    return root
