"""Runs the shared store conformance suite against every store in ``STORE_KINDS``."""

from __future__ import annotations

from tests.stores.conformance import StoreConformance


class TestStoreConformance(StoreConformance):
    """Parametrized by ``store_harness`` over the filesystem and S3 stores."""
