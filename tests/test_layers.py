"""The layers hold: dependencies point down only (contracts in pyproject.toml,
checked by import-linter over the real package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    # A fresh interpreter with ``cwd`` first on the path, so the package
    # analysed is the one in ``cwd``, whatever is installed.
    return subprocess.run(
        [sys.executable, "-c",
         "import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd)},
        capture_output=True, text=True, timeout=120,
    )


def test_every_layer_contract_is_kept() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("app/core/rules.py", "import aiohttp", "The core is pure"),
    ("app/stores/memory.py", "import app.ops.metrics", "Stores know nothing"),
    ("app/http/edge.py", "import app.stores.s3.store", "never a concrete store"),
    ("app/engine/engine.py", "import app.http.keys", "Layers"),
])
def test_a_broken_layer_is_caught(tmp_path: Path, module: str, line: str, contract: str) -> None:
    shutil.copytree(ROOT / "app", tmp_path / "app",
                    ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken), result.stdout
