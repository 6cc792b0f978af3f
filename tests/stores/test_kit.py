"""Runs the store kit against every store in ``KIT_KINDS``."""

from __future__ import annotations

import pytest

from tests.stores.kit import Harness, StoreKit


@pytest.fixture
def harness(kit_harness: Harness) -> Harness:
    return kit_harness


class TestStoreKit(StoreKit):
    """Parametrized by ``kit_harness`` over the memory, filesystem and S3 stores."""
