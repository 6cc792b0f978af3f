"""Store selection: ``open_store`` builds the store that ``storage.backend`` names.

Kept apart from the package's ``__init__`` so that importing the contract
(``app.stores.base``) never loads a concrete store and its client libraries.
"""

from __future__ import annotations

from app.config import StorageConfig
from app.stores.base import Store
from app.stores.filesystem.store import FilesystemStore
from app.stores.memory import MemoryStore
from app.stores.s3.store import S3Store


async def open_store(config: StorageConfig) -> Store:
    """Open the configured store; the caller closes it with ``await store.close()``."""
    if config.backend == "s3":
        return await S3Store.open(config)
    if config.backend == "memory":
        return await MemoryStore.open(config)
    return await FilesystemStore.open(config)
