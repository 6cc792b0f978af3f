"""What a store author supplies to run the kit: one ``Harness`` per backend.

The kit's tests know nothing of any backend. Everything that differs between
backends is answered here: how to open a store over fresh backing storage,
how to open another instance over the *same* storage (a restart, or a second
process), and how to read a finished object's bytes straight from the backend,
so byte-identity is checked without trusting the store under test.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import pytest

from app.config import StorageConfig
from app.stores.base import Store


class Harness(Protocol):
    """One backend's storage for one test (the ``harness`` fixture yields it)."""

    @property
    def storage(self) -> StorageConfig:
        """The storage configuration stores are opened with (the kit reads
        ``part_size`` from it)."""
        ...

    #: Kit tests this backend is known not to pass, by test function name,
    #: with the reason; they are skipped, never silently dropped.
    known_differences: Mapping[str, str]

    async def open(self) -> Store:
        """A new store instance over this test's backing storage. The first
        call sees empty storage; every later one sees what earlier ones left."""
        ...

    async def open_with(self, **storage_overrides: object) -> Store:
        """Like ``open``, with some ``storage`` keys changed, e.g.
        ``open_with(part_size=5 * 1024 * 1024)``."""
        ...

    def read_object(self, name: str) -> bytes | None:
        """The bytes of the finished object ``name`` as the backend holds them,
        or None if there is none."""
        ...


class KitTests:
    """Base of every kit module's test class: applies the harness's known differences."""

    @pytest.fixture(autouse=True)
    def _known_difference(self, harness: Harness, request: pytest.FixtureRequest) -> None:
        name = getattr(request.node, "originalname", request.node.name)
        reason = harness.known_differences.get(name)
        if reason is not None:
            pytest.skip(f"known difference of this backend: {reason}")
