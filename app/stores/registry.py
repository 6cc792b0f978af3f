"""Store selection: ``open_store`` builds the store that ``storage.backend`` names.

Kept apart from the package's ``__init__`` so that importing the contract
(``app.stores.base``) never loads a concrete store and its client libraries.
"""

from __future__ import annotations

from app.config import StorageConfig
from app.core.budget import MemoryBudget
from app.stores.base import Store
from app.stores.filesystem.store import FilesystemStore
from app.stores.memory import MemoryStore
from app.stores.s3.store import S3Store


async def open_store(
    config: StorageConfig, budget: MemoryBudget | None = None, *, serving: bool = True
) -> Store:
    """Open the configured store; the caller closes it with ``await store.close()``.
    ``budget``: the app's memory budget. Only the S3 store takes from it: the
    filesystem store writes each chunk as it comes, and the memory store
    keeps every upload in memory by design (tests and demos). ``serving``:
    for an instance that takes uploads; the S3 store then checks that its
    bucket enforces conditional writes (tools such as the cleanup job skip it)."""
    if config.backend == "s3":
        return await S3Store.open(config, budget, check_writes=serving)
    if config.backend == "memory":
        return await MemoryStore.open(config)
    return await FilesystemStore.open(config)
