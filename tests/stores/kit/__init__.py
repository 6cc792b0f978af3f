"""The store kit: the black-box suite every ``Store`` must pass.

Written once against the contract in ``app/stores/base.py``, one module per
operation (in the manner of fsspec's ``fsspec/tests/abstract/``)::

    harness.py       the Harness protocol a store author implements, KitTests
    helpers.py       payload, chunked, new_upload, append, durable_fields
    create.py        create, get, metadata, part sizes, unknown uploads
    write.py         appends, CRC32C, offsets, totals, partial streams
    finish.py        finish: idempotence, md5, early finish, empty objects
    cancel.py        replacing and cancelling
    listing.py       list_unfinished, list_completed
    restart.py       a second instance over the same storage; stale writers
    capabilities.py  HealthCheck, CallbackOutbox (skipped if the store lacks them)
    concat.py        Concatenation, ObjectReader (skipped if the store lacks them)

A backend runs it by supplying a ``harness`` fixture and subclassing
``StoreKit`` (see ``tests/stores/test_kit.py`` and ``docs/stores.md``). A
test needs nothing else: no test branches on the backend. Data stays small
(at most ~15 MiB per test) because moto is slow.
"""

from __future__ import annotations

from tests.stores.kit.cancel import CancelTests
from tests.stores.kit.capabilities import CapabilityTests
from tests.stores.kit.concat import ConcatTests
from tests.stores.kit.create import CreateTests
from tests.stores.kit.finish import FinishTests
from tests.stores.kit.harness import Harness, KitTests
from tests.stores.kit.listing import ListingTests
from tests.stores.kit.restart import RestartTests
from tests.stores.kit.write import WriteTests

__all__ = ["Harness", "KitTests", "StoreKit"]


class StoreKit(
    CreateTests,
    WriteTests,
    FinishTests,
    CancelTests,
    ListingTests,
    RestartTests,
    CapabilityTests,
    ConcatTests,
):
    """The whole kit; subclass it as ``TestXxx`` next to a ``harness`` fixture."""
