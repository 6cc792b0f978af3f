"""The S3 store's modules share only public names (what stores may import
at all is held by the layer contracts, tests/test_layers.py)."""

from __future__ import annotations

import ast
from pathlib import Path

STORES = Path(__file__).resolve().parents[2] / "app" / "stores"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_s3_modules_share_no_private_names() -> None:
    bad = [
        f"{path.name}: {module}.{name}"
        for path in (STORES / "s3").glob("*.py")
        for module, names in imports(path)
        if module.startswith("app.")
        for name in names
        if name.startswith("_")
    ]
    assert bad == []
