"""Store selection: ``open_store`` builds the store that ``storage.backend`` names."""

from __future__ import annotations

from app.config import StorageConfig
from app.stores.base import Store


async def open_store(config: StorageConfig) -> Store:
    """Open the configured store; the caller closes it with ``await store.close()``."""
    if config.backend == "s3":
        from app.stores.s3.store import S3Store

        return await S3Store.open(config)
    if config.backend == "memory":
        from app.stores.memory import MemoryStore

        return await MemoryStore.open(config)
    from app.stores.filesystem.store import FilesystemStore

    return await FilesystemStore.open(config)
